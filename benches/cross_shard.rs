//! Micro-benchmark of one cross-shard round trip as the broker makes it: two glommio executors
//! pinned to two cores, a full `channel_mesh` between them, a request carrying a oneshot reply
//! sender, answered by the other shard. Measured with the broker's `spin_before_park` (50 µs) and
//! without it (the executor parks between messages). Needs two cores.
//! Run: `cargo bench --bench cross_shard`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use futures::channel::oneshot;
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};

type Request = (u64, oneshot::Sender<u64>);

/// Mesh capacity as the broker configures it (tiny capacities are known to deadlock in glommio).
const MESH_CAPACITY: usize = 1024;

fn placement(core: usize) -> Placement {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    match cores.get(core % cores.len().max(1)) {
        Some(c) => Placement::Fixed(c.id),
        None => Placement::Unbound,
    }
}

/// `iters` round trips from shard 0 to shard 1; returns the time shard 0 spent on them.
fn round_trips(iters: u64, spin: Option<Duration>) -> Duration {
    let mesh = MeshBuilder::<Request, _>::full(2, MESH_CAPACITY);
    let executor = |id: usize| {
        let mut builder =
            LocalExecutorBuilder::new(placement(id)).name(&format!("bench-shard-{id}")).io_memory(1 << 20);
        if let Some(spin) = spin {
            builder = builder.spin_before_park(spin);
        }
        builder
    };
    let server_mesh = mesh.clone();
    let server = executor(1)
        .spawn(move || async move {
            let (_senders, mut receivers) = server_mesh.join().await.expect("join mesh");
            let streams = receivers.streams();
            for (_, receiver) in streams {
                while let Some((value, reply)) = receiver.recv().await {
                    let _ = reply.send(value + 1);
                }
            }
        })
        .expect("start shard 1");
    let client = executor(0)
        .spawn(move || async move {
            let (senders, _receivers) = mesh.join().await.expect("join mesh");
            let peer = (0..senders.nr_consumers()).find(|&p| p != senders.peer_id()).expect("a peer");
            let started = Instant::now();
            for i in 0..iters {
                let (tx, rx) = oneshot::channel();
                senders.send_to(peer, (i, tx)).await.expect("peer alive");
                let answer = rx.await.expect("peer answered");
                assert_eq!(answer, i + 1);
            }
            started.elapsed()
        })
        .expect("start shard 0");
    let elapsed = client.join().expect("shard 0 finished");
    server.join().expect("shard 1 finished");
    elapsed
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("cross_shard_round_trip");
    g.sample_size(20);
    g.bench_function("spin_50us", |b| {
        b.iter_custom(|iters| round_trips(iters, Some(Duration::from_micros(50))))
    });
    g.bench_function("parked", |b| b.iter_custom(|iters| round_trips(iters, None)));
    g.finish();
}

criterion_group!(cross_shard, benches);
criterion_main!(cross_shard);
