//! The broker's listening sockets, each claimed by this process alone.
//!
//! Owns: binding every address the broker serves — `listen`, `kafka_listen`, the per-shard
//! direct ports (`shard_port_base`) and `admin_listen` — on the main thread before any shard
//! starts; waiting, at most `listen_wait_ms`, for a port that a dying predecessor still holds;
//! naming whoever holds a port that stays taken; and handing each shard its own descriptors.
//!
//! Why not one SO_REUSEPORT socket per shard: Linux lets any process of the same user join a
//! SO_REUSEPORT group, so a second broker started on the same ports, or a broker restarted while
//! its killed predecessor's io_uring still holds the old sockets, silently takes a share of the
//! connections (issue 16). Here each address is one socket bound without SO_REUSEPORT (its
//! SO_REUSEADDR only tolerates connections in TIME_WAIT), so any other process gets EADDRINUSE.
//! Every shard accepts from its own `dup` of that socket: one accept queue, drained by whichever
//! shard is free, so a busy or stalled shard leaves new connections to the others.
//!
//! The sockets are non-blocking for good. glommio's accept first tries a plain accept(2), setting
//! O_NONBLOCK around it and restoring the flags after; the flags belong to the socket that every
//! shard's descriptor shares, so with a blocking socket one shard's restore could land while
//! another shard is inside accept(2) and block that shard's whole executor. On a socket that is
//! already non-blocking the save and restore change nothing, and io_uring's accept still waits
//! for a connection since Linux 5.18 (a73825ba70c9, also in 5.15.89): older kernels answer it
//! with EAGAIN at once, which `server` would log and retry every 10 ms.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::time::{Duration, Instant};

use glommio::net::TcpListener;
use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;

use crate::config::BrokerConfig;

/// The admin listener's address when `admin_listen` is not set.
pub const ADMIN_LISTEN_DEFAULT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9293);
/// Accept queue per shard sharing a socket; one shared socket gets the room the per-shard
/// sockets had together (the kernel caps it at net.core.somaxconn).
const BACKLOG_PER_SHARD: i32 = 1024;
/// Accept queue of a socket one shard accepts from (a direct port, the admin listener).
const BACKLOG_SINGLE: i32 = 1024;
/// How often a taken port is tried again while waiting for it.
const RETRY_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Debug, Error)]
pub enum ListenError {
    #[error("cannot listen on {addr} ({option}): address already in use, {holder}; gave up after {waited_ms} ms (listen_wait_ms = {wait_ms})")]
    Taken { option: &'static str, addr: SocketAddr, holder: Holder, waited_ms: u128, wait_ms: u128 },
    #[error("cannot listen on {addr} ({option}): {other} is configured on the same port")]
    Overlap { option: &'static str, addr: SocketAddr, other: &'static str },
    #[error("cannot listen on {addr} ({option}): {source}")]
    Bind { option: &'static str, addr: SocketAddr, source: io::Error },
    #[error("option `{option}`: {message}")]
    Address { option: &'static str, message: String },
    #[error("cannot give shard {shard} a descriptor of {addr} ({option}): {source}")]
    Share { option: &'static str, addr: SocketAddr, shard: usize, source: io::Error },
}

/// What holds a listening port, as far as this process can see.
#[derive(Debug)]
pub enum Holder {
    Process {
        pid: u32,
        comm: String,
    },
    /// A listening socket is there, but no process this one can inspect has it open.
    Unseen {
        inode: u64,
        uid: u32,
    },
    /// /proc/net/tcp{,6} lists no listening socket on that address.
    NotListed,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Process { pid, comm } if *pid == std::process::id() => {
                write!(f, "held by this process (pid {pid}, {comm}): another of its listeners")
            }
            Holder::Process { pid, comm } => write!(f, "held by pid {pid} ({comm})"),
            Holder::Unseen { inode, uid } => write!(
                f,
                "held by a listening socket (inode {inode}, uid {uid}) that no process visible here has \
                 open: a process of another user, or one that is exiting (a killed process's io_uring \
                 closes its sockets shortly after it dies)"
            ),
            Holder::NotListed => {
                write!(f, "no listening socket on it is listed in /proc/net/tcp: the holder is unknown")
            }
        }
    }
}

impl Holder {
    /// Finds the listening socket on `addr` in /proc/net/tcp{,6}, then the process whose
    /// descriptor table links to it.
    fn of(addr: SocketAddr) -> Holder {
        let Some((inode, uid)) = listening_socket(addr) else { return Holder::NotListed };
        match process_with_socket(inode) {
            Some((pid, comm)) => Holder::Process { pid, comm },
            None => Holder::Unseen { inode, uid },
        }
    }

    /// Whether this may be a predecessor of ours that is exiting: no live process has the
    /// socket, and it belongs to our user.
    fn may_be_exiting(&self) -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        match self {
            Holder::Process { .. } => false,
            Holder::Unseen { uid, .. } => *uid == euid,
            Holder::NotListed => true,
        }
    }
}

/// A socket bound and listening, and the address it got (the port, when 0 was asked).
struct Claimed {
    socket: OwnedFd,
    addr: SocketAddr,
}

/// Every listening socket of the broker, bound before the shards start.
pub struct Listeners {
    native: Claimed,
    kafka: Option<Claimed>,
    /// Shard N's direct port is `direct[N]`.
    direct: Vec<Claimed>,
    admin: Claimed,
    /// The replication listener of a node in a cluster, served by shard 0.
    peer: Option<Claimed>,
}

/// One shard's descriptors of the broker's sockets; sent to the shard's thread.
pub struct ShardListeners {
    native: OwnedFd,
    kafka: Option<OwnedFd>,
    direct: OwnedFd,
    /// Only shard 0 serves the admin listener and the peer listener.
    admin: Option<OwnedFd>,
    peer: Option<OwnedFd>,
}

/// A shard's listeners, registered with its executor.
pub struct OpenListeners {
    pub native: TcpListener,
    pub kafka: Option<TcpListener>,
    pub direct: TcpListener,
    pub admin: Option<TcpListener>,
    pub peer: Option<TcpListener>,
}

/// Binds every listener of a broker with `shards` shards. A port that is taken is retried every
/// 50 ms until `listen_wait_ms` after the first attempt; an explicit address that stays taken
/// fails start-up naming it and its holder, while the unset `admin_listen` falls back to a free
/// port with a warning.
pub fn bind(config: &BrokerConfig, shards: usize) -> Result<Listeners, ListenError> {
    let mut binder = Binder {
        started: Instant::now(),
        wait: Duration::from_millis(config.listen_wait_ms),
        claimed: Vec::new(),
        reserved: configured_ports(config, shards),
    };
    let shared_backlog = BACKLOG_PER_SHARD.saturating_mul(i32::try_from(shards).unwrap_or(i32::MAX));
    let native = binder.claim("listen", config.listen, shared_backlog)?;
    let kafka = match config.kafka_listen_addr() {
        Ok(Some(addr)) => Some(binder.claim("kafka_listen", addr, shared_backlog)?),
        Ok(None) => None,
        Err(message) => return Err(ListenError::Address { option: "kafka_listen", message }),
    };
    let mut direct = Vec::with_capacity(shards);
    for shard in 0..shards {
        let port = match config.shard_port_base {
            0 => 0,
            base => u16::try_from(shard).ok().and_then(|s| base.checked_add(s)).ok_or_else(|| {
                ListenError::Address {
                    option: "shard_port_base",
                    message: format!("{base} + shard {shard} is past port 65535"),
                }
            })?,
        };
        let addr = SocketAddr::new(config.listen.ip(), port);
        direct.push(binder.claim("shard_port_base", addr, BACKLOG_SINGLE)?);
    }
    let admin = match config.admin_listen {
        Some(addr) => binder.claim("admin_listen", addr, BACKLOG_SINGLE)?,
        None => binder.claim_default_admin()?,
    };
    let peer = match config.cluster() {
        Ok(Some(cluster)) => Some(binder.claim("peer_listen", cluster.peer_listen, BACKLOG_SINGLE)?),
        Ok(None) => None,
        Err(message) => return Err(ListenError::Address { option: "seeds", message }),
    };
    Ok(Listeners { native, kafka, direct, admin, peer })
}

impl Listeners {
    pub fn native_addr(&self) -> SocketAddr {
        self.native.addr
    }

    pub fn kafka_addr(&self) -> Option<SocketAddr> {
        self.kafka.as_ref().map(|k| k.addr)
    }

    /// Each shard's direct address, in shard order.
    pub fn direct_addrs(&self) -> Vec<SocketAddr> {
        self.direct.iter().map(|d| d.addr).collect()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.addr
    }

    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer.as_ref().map(|p| p.addr)
    }

    /// Each shard's descriptors, in shard order: its own `dup` of the shared sockets, its direct
    /// socket, and for shard 0 the admin socket.
    pub fn into_shards(self) -> Result<Vec<ShardListeners>, ListenError> {
        let Listeners { native, kafka, direct, admin, peer } = self;
        let mut admin = Some(admin.socket);
        let mut peer = peer.map(|p| p.socket);
        let mut shards = Vec::with_capacity(direct.len());
        for (shard, direct) in direct.into_iter().enumerate() {
            let share = |claimed: &Claimed, option| {
                claimed.socket.try_clone().map_err(|source| ListenError::Share {
                    option,
                    addr: claimed.addr,
                    shard,
                    source,
                })
            };
            shards.push(ShardListeners {
                native: share(&native, "listen")?,
                kafka: kafka.as_ref().map(|k| share(k, "kafka_listen")).transpose()?,
                direct: direct.socket,
                admin: admin.take(),
                peer: peer.take(),
            });
        }
        Ok(shards)
    }
}

impl ShardListeners {
    /// Registers the descriptors with the executor this runs on (glommio ties a listener to
    /// the executor that creates it).
    pub fn open(self) -> OpenListeners {
        OpenListeners {
            native: glommio_listener(self.native),
            kafka: self.kafka.map(glommio_listener),
            direct: glommio_listener(self.direct),
            admin: self.admin.map(glommio_listener),
            peer: self.peer.map(glommio_listener),
        }
    }
}

fn glommio_listener(socket: OwnedFd) -> TcpListener {
    // SAFETY: `socket` is a bound, listening TCP socket (`bind_once`) that we own; ownership
    // moves into the glommio listener, which closes it when dropped.
    unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) }
}

struct Binder {
    started: Instant,
    wait: Duration,
    /// What is bound so far, to refuse one port configured for two listeners.
    claimed: Vec<(&'static str, SocketAddr)>,
    /// Ports configured for this broker's listeners and its cluster's peers: a port the kernel
    /// picks for a port-0 listener must not be one of these, or the broker would hold a port
    /// before the listener configured there binds it (seen in CI: kafka_listen on port 0 given
    /// the node's own peer_listen port).
    reserved: Vec<u16>,
}

/// Every port configured for one of the broker's listeners, and the cluster's peer ports (port
/// 0, "any", left out).
fn configured_ports(config: &BrokerConfig, shards: usize) -> Vec<u16> {
    let mut ports = vec![config.listen.port()];
    if let Ok(Some(kafka)) = config.kafka_listen_addr() {
        ports.push(kafka.port());
    }
    if config.shard_port_base != 0 {
        let shards = u16::try_from(shards).unwrap_or(u16::MAX);
        ports.extend((0..shards).filter_map(|shard| config.shard_port_base.checked_add(shard)));
    }
    ports.push(config.admin_listen.map_or(ADMIN_LISTEN_DEFAULT.port(), |a| a.port()));
    // Every node's peer port, not only this one's: nodes of a cluster on one host (tests, a
    // laptop) start together, and one's port-0 listener must not take another's peer port.
    if let Ok(Some(cluster)) = config.cluster() {
        ports.push(cluster.peer_listen.port());
        ports.extend(cluster.voters.values().map(SocketAddr::port));
    }
    ports.retain(|&port| port != 0);
    ports
}

/// Port-0 binds tried before giving up on avoiding the configured ports.
const PICKS_MAX: usize = 16;

impl Binder {
    /// Binds `addr` for `option`, waiting for it while it is taken.
    fn claim(
        &mut self,
        option: &'static str,
        addr: SocketAddr,
        backlog: i32,
    ) -> Result<Claimed, ListenError> {
        let overlap = self.claimed.iter().find(|(_, other)| {
            addr.port() != 0 && other.port() == addr.port() && same_or_wildcard(other.ip(), addr.ip())
        });
        if let Some(&(other, _)) = overlap {
            return Err(ListenError::Overlap { option, addr, other });
        }
        let mut claimed = self.bind_waiting(option, addr, backlog, true)?;
        if addr.port() == 0 {
            // Held until a pick is good, so the kernel does not hand the same port back.
            let mut refused = Vec::new();
            while self.reserved.contains(&claimed.addr.port()) && refused.len() < PICKS_MAX {
                let again = self.bind_waiting(option, addr, backlog, true)?;
                refused.push(std::mem::replace(&mut claimed, again));
            }
        }
        self.claimed.push((option, claimed.addr));
        Ok(claimed)
    }

    /// The unset `admin_listen`: the default port, waited for only while it may be a dying
    /// predecessor's; a port that another program holds falls back to a free one at once.
    fn claim_default_admin(&mut self) -> Result<Claimed, ListenError> {
        match self.bind_waiting("admin_listen", ADMIN_LISTEN_DEFAULT, BACKLOG_SINGLE, false) {
            Ok(claimed) => {
                self.claimed.push(("admin_listen", claimed.addr));
                Ok(claimed)
            }
            Err(ListenError::Taken { holder, .. }) => {
                tracing::warn!(
                    "admin listener: {ADMIN_LISTEN_DEFAULT} is in use, {holder}; using a free port instead \
                     (the ready line names it; set admin_listen to choose one)"
                );
                self.claim("admin_listen", SocketAddr::new(ADMIN_LISTEN_DEFAULT.ip(), 0), BACKLOG_SINGLE)
            }
            Err(e) => Err(e),
        }
    }

    /// Binds until it succeeds, fails with anything but EADDRINUSE, or the wait is over. With
    /// `wait_for_others` false, only a port that a predecessor may be releasing is waited for.
    fn bind_waiting(
        &self,
        option: &'static str,
        addr: SocketAddr,
        backlog: i32,
        wait_for_others: bool,
    ) -> Result<Claimed, ListenError> {
        let deadline = self.started + self.wait;
        let mut waiting_since: Option<Instant> = None;
        loop {
            let source = match bind_once(addr, backlog) {
                Ok(claimed) => {
                    if let Some(since) = waiting_since {
                        tracing::info!(
                            "{addr} ({option}) is free after waiting {} ms",
                            since.elapsed().as_millis()
                        );
                    }
                    return Ok(claimed);
                }
                Err(source) => source,
            };
            if source.kind() != io::ErrorKind::AddrInUse {
                return Err(ListenError::Bind { option, addr, source });
            }
            let now = Instant::now();
            let taken = |holder| ListenError::Taken {
                option,
                addr,
                holder,
                waited_ms: now.duration_since(self.started).as_millis(),
                wait_ms: self.wait.as_millis(),
            };
            if now >= deadline {
                return Err(taken(Holder::of(addr)));
            }
            if waiting_since.is_none() {
                let holder = Holder::of(addr);
                if !wait_for_others && !holder.may_be_exiting() {
                    return Err(taken(holder));
                }
                tracing::warn!(
                    "{addr} ({option}) is in use, {holder}; retrying every {} ms for up to {} ms (listen_wait_ms)",
                    RETRY_INTERVAL.as_millis(),
                    deadline.duration_since(now).as_millis()
                );
                waiting_since = Some(now);
            }
            std::thread::sleep(RETRY_INTERVAL.min(deadline - now));
        }
    }
}

/// One exclusive, non-blocking listening socket (see the module comment for why both).
fn bind_once(addr: SocketAddr, backlog: i32) -> io::Result<Claimed> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Lets a restart bind over its predecessor's connections in TIME_WAIT; unlike SO_REUSEPORT it
    // never lets a second listening socket onto the port.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    let local = socket.local_addr()?.as_socket().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "a TCP socket reported a non-IP local address")
    })?;
    Ok(Claimed { socket: socket.into(), addr: local })
}

fn same_or_wildcard(a: IpAddr, b: IpAddr) -> bool {
    a == b || a.is_unspecified() || b.is_unspecified()
}

/// The inode and owner uid of the listening socket on `addr`, from /proc/net/tcp{,6}.
fn listening_socket(addr: SocketAddr) -> Option<(u64, u32)> {
    const LISTEN: &str = "0A";
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
        for fields in text.lines().skip(1).map(|l| l.split_whitespace().collect::<Vec<_>>()) {
            let [_, local, _, state, _, _, _, uid, _, inode, ..] = fields[..] else { continue };
            let Some((ip, port)) = local.split_once(':') else { continue };
            if state != LISTEN || u16::from_str_radix(port, 16) != Ok(addr.port()) {
                continue;
            }
            if !parse_proc_ip(ip).is_some_and(|ip| same_or_wildcard(ip, addr.ip())) {
                continue;
            }
            if let (Ok(uid), Ok(inode)) = (uid.parse(), inode.parse()) {
                return Some((inode, uid));
            }
        }
    }
    None
}

/// /proc/net/tcp prints an address as 32-bit words in hex, each in host byte order.
fn parse_proc_ip(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| hex.get(i * 8..i * 8 + 8).and_then(|w| u32::from_str_radix(w, 16).ok());
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?.to_ne_bytes()))),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(i)?.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// The first process (pid, command name) with a descriptor on socket `inode`; processes whose
/// descriptors this one may not read are skipped.
fn process_with_socket(inode: u64) -> Option<(u32, String)> {
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        let holds = fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()));
        if holds {
            let comm = std::fs::read_to_string(entry.path().join("comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_else(|_| "command unknown".to_string());
            return Some((pid, comm));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_addresses_parse_in_host_order() {
        // How the kernel prints 127.0.0.1 and ::1 on a little-endian host.
        if cfg!(target_endian = "little") {
            assert_eq!(parse_proc_ip("0100007F"), Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
            assert_eq!(
                parse_proc_ip("00000000000000000000000001000000"),
                Some(IpAddr::V6(Ipv6Addr::LOCALHOST))
            );
        }
        assert_eq!(parse_proc_ip("00000000"), Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)));
        assert_eq!(parse_proc_ip("xyz"), None);
    }

    #[test]
    fn a_second_bind_is_refused_and_its_holder_named() {
        let first = bind_once("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let err = bind_once(first.addr, 16).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        match Holder::of(first.addr) {
            Holder::Process { pid, .. } => assert_eq!(pid, std::process::id()),
            other => panic!("expected this process, got {other}"),
        }
    }
}
