//! The network between a cluster's nodes, as a test controls it: a relay in the test process
//! stands between the nodes' peer listeners, so one node can be cut off from its peers (silently
//! or refused) while clients still reach it directly. No firewall is needed, nor root.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex};

/// How a node is cut off from its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Connections to and from it are closed and new ones refused, as by an unreachable host.
    Refused,
    /// Nothing it sends arrives and nothing reaches it; connections stay open and what was sent
    /// arrives late, once the cut heals, as over a network that dropped packets for a while.
    Silent,
}

/// The network between the nodes' peer listeners, as a test controls it. Each node listens for
/// peers on a port of its own (`peer_listen`) while the seeds name a relay in this process, which
/// reads each connection's handshake (it names the dialing and the dialed node) and forwards it.
/// `isolate(n, cut)` cuts node `n` off from every peer until `heal`; clients still reach `n`
/// directly. A node cut off, not frozen.
pub struct PeerRelay {
    shared: Shared,
    ports: Vec<u16>,
}

/// The relay's state and the signal that it changed.
type Shared = Arc<(Mutex<RelayState>, std::sync::Condvar)>;

#[derive(Default)]
struct RelayState {
    isolated: std::collections::BTreeMap<u64, Cut>,
    /// Connections being forwarded: an id, the nodes they join, both sockets.
    open: Vec<(u64, [u64; 2], [TcpStream; 2])>,
    next: u64,
    stopped: bool,
}

impl RelayState {
    fn cut(&self, ends: [u64; 2]) -> Option<Cut> {
        ends.iter().filter_map(|n| self.isolated.get(n).copied()).max_by_key(|&c| c == Cut::Refused)
    }
}

impl PeerRelay {
    /// A relay in front of each node's real peer port (`targets[i]` is node `i + 1`'s); returns
    /// it and the seed list naming the relays.
    pub fn start(targets: &[u16]) -> (PeerRelay, String) {
        let shared = Arc::new((Mutex::new(RelayState::default()), std::sync::Condvar::new()));
        let mut seeds = Vec::new();
        let mut ports = Vec::new();
        for (i, &target) in targets.iter().enumerate() {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            seeds.push(format!("{}@127.0.0.1:{port}", i + 1));
            ports.push(port);
            let shared = shared.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if shared.0.lock().unwrap().stopped {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let shared = shared.clone();
                    std::thread::spawn(move || relay(stream, target, &shared));
                }
            });
        }
        (PeerRelay { shared, ports }, seeds.join(","))
    }

    pub fn isolate(&self, node: u64, cut: Cut) {
        let mut state = self.shared.0.lock().unwrap();
        state.isolated.insert(node, cut);
        if cut == Cut::Refused {
            state.open.retain(|(_, ends, sockets)| {
                let joined = ends.contains(&node);
                if joined {
                    sockets.iter().for_each(|s| drop(s.shutdown(Shutdown::Both)));
                }
                !joined
            });
        }
    }

    pub fn heal(&self) {
        self.shared.0.lock().unwrap().isolated.clear();
        self.shared.1.notify_all();
    }
}

impl Drop for PeerRelay {
    fn drop(&mut self) {
        let mut state = self.shared.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        state.stopped = true;
        for (_, _, sockets) in state.open.drain(..) {
            sockets.iter().for_each(|s| drop(s.shutdown(Shutdown::Both)));
        }
        drop(state);
        self.shared.1.notify_all();
        // Wakes each relay's accept so its thread sees `stopped` and ends.
        for port in &self.ports {
            drop(TcpStream::connect(("127.0.0.1", *port)));
        }
    }
}

/// Waits while a silent cut holds the connection between `ends`; false once the relay stops.
fn pass(shared: &Shared, ends: [u64; 2]) -> bool {
    let mut state = shared.0.lock().unwrap();
    while !state.stopped && state.cut(ends) == Some(Cut::Silent) {
        state = shared.1.wait(state).unwrap();
    }
    !state.stopped
}

/// Copies `from` to `to`, holding each chunk while a silent cut lasts.
fn pump(mut from: TcpStream, mut to: TcpStream, ends: [u64; 2], shared: &Shared) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        if !pass(shared, ends) || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    drop(from.shutdown(Shutdown::Both));
    drop(to.shutdown(Shutdown::Both));
}

/// Forwards one peer connection to the node listening on `target`: refused while either end is
/// cut off with `Cut::Refused` (both sockets close, the dialer retries as after any failed
/// handshake), held while a silent cut lasts.
fn relay(mut dialer: TcpStream, target: u16, shared: &Shared) {
    // The handshake's head: magic (8 bytes), cluster id, from and to (8 each), then the length
    // of the JSON that follows it.
    let mut head = [0u8; 36];
    if dialer.read_exact(&mut head).is_err() {
        return;
    }
    let ends = [16, 24].map(|at| u64::from_be_bytes(head[at..at + 8].try_into().unwrap()));
    if !pass(shared, ends) {
        return;
    }
    let Ok(mut node) = TcpStream::connect(("127.0.0.1", target)) else { return };
    let id = {
        let mut state = shared.0.lock().unwrap();
        if state.stopped || state.cut(ends) == Some(Cut::Refused) {
            return;
        }
        let id = state.next;
        state.next += 1;
        state.open.push((id, ends, [dialer.try_clone().unwrap(), node.try_clone().unwrap()]));
        id
    };
    if node.write_all(&head).is_ok() {
        let (back_from, back_to) = (node.try_clone().unwrap(), dialer.try_clone().unwrap());
        let back = {
            let shared = shared.clone();
            std::thread::spawn(move || pump(back_from, back_to, ends, &shared))
        };
        pump(dialer, node, ends, shared);
        drop(back.join());
    }
    shared.0.lock().unwrap().open.retain(|(open, _, _)| *open != id);
}
