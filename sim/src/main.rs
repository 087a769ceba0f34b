//! `ringlog-sim`: runs whole clusters on simulated time, one seed each, and checks the
//! replication invariants (`checker`). `--seeds N` sweeps N seeds; `--seed S --trace` replays
//! one with a readable trace of what happened. A failure prints its seed.

mod checker;
mod controller_disk;
mod disk;
mod world;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(about = "Deterministic simulator of ringlog's replication: the same seed replays the same run")]
struct Args {
    /// Run this many seeds, starting at --first-seed.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// Replay one seed (overrides --seeds).
    #[arg(long)]
    seed: Option<u64>,
    /// Print what happened, event by event (with --seed).
    #[arg(long)]
    trace: bool,
    /// Run a deliberately broken variant, to see the checker catch it.
    #[arg(long, value_enum, default_value = "none")]
    broken: world::Broken,
    /// Idle groups go quiet, nodes exchange keepalives and count a peer unheard for an election
    /// timeout as down (waking quiet groups that depend on it); writes come with idle gaps.
    #[arg(long)]
    quiesce: bool,
}

struct Outcome {
    failure: Option<String>,
    digest: u64,
    summary: String,
    trace: Option<String>,
    /// Logs restarted from a leader's snapshot.
    restarts: u64,
    /// Compactions whose save failed (the replica stopped).
    failed_saves: u64,
}

fn run_seed(seed: u64, trace: bool, broken: world::Broken, quiesce: bool) -> Outcome {
    run_world(seed, trace, broken, quiesce, true)
}

/// `run_seed`, with compaction on or off (`World::new`).
fn run_world(seed: u64, trace: bool, broken: world::Broken, quiesce: bool, compact: bool) -> Outcome {
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut world = world::World::new(seed, trace, broken, quiesce, compact);
        let digest = world.run();
        let s = &world.scenario;
        let c = &world.controller.checker;
        let snapshots = world.snapshots.counts;
        let summary = format!(
            "{} nodes, {} groups, {} elections, {} records acknowledged, {} frames for {} raft messages; \
             controller: {} elections, {} topic changes answered, {} client retries, {} repeats skipped, {} frames",
            s.nodes,
            s.groups,
            world.checker.elections,
            world.checker.acknowledged(),
            world.frames_sent,
            world.messages_sent,
            c.elections(),
            c.answered(),
            c.client_retries,
            c.repeats,
            c.frames
        ) + &if quiesce {
            format!(
                ", {} group-ticks skipped quiet, {} quiet followers woken by their leader's death",
                world.quiet_ticks, world.woken_by_death
            )
        } else {
            String::new()
        } + &format!(
            "; {} compactions ({} saves failed), {} snapshots sent, {} log restarts ({} finished on open, {} undone by a crash)",
            snapshots.compactions,
            snapshots.failed_saves,
            snapshots.sent,
            snapshots.restarts,
            snapshots.finished_on_open,
            snapshots.undone
        );
        Outcome {
            failure: world.checker.failure().map(str::to_owned),
            digest,
            summary,
            trace: world.trace.take(),
            restarts: snapshots.restarts,
            failed_saves: snapshots.failed_saves,
        }
    }));
    result.unwrap_or_else(|panic| {
        let reason = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        Outcome {
            failure: Some(format!("panicked: {reason}")),
            digest: 0,
            summary: String::new(),
            trace: None,
            restarts: 0,
            failed_saves: 0,
        }
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(seed) = args.seed {
        let outcome = run_seed(seed, args.trace, args.broken, args.quiesce);
        if let Some(trace) = &outcome.trace {
            print!("{trace}");
        }
        println!("seed {seed}: {} (digest {:016x})", outcome.summary, outcome.digest);
        return match outcome.failure {
            None => ExitCode::SUCCESS,
            Some(reason) => {
                println!("seed {seed} FAILED: {reason}");
                ExitCode::FAILURE
            }
        };
    }
    // Panics are reported per seed below; the default hook's backtrace would bury them.
    std::panic::set_hook(Box::new(|_| {}));
    let mut failed = 0;
    let mut restarts = 0;
    let mut failed_saves = 0;
    for seed in args.first_seed..args.first_seed + args.seeds {
        let outcome = run_seed(seed, false, args.broken, args.quiesce);
        restarts += outcome.restarts;
        failed_saves += outcome.failed_saves;
        if let Some(reason) = outcome.failure {
            failed += 1;
            let broken = match args.broken {
                world::Broken::None => String::new(),
                other => format!(
                    " --broken {}",
                    clap::ValueEnum::to_possible_value(&other)
                        .map_or_else(String::new, |v| v.get_name().to_string())
                ),
            };
            let quiesce = if args.quiesce { " --quiesce" } else { "" };
            println!(
                "seed {seed} FAILED: {reason}  (replay: ringlog-sim --seed {seed}{broken}{quiesce} --trace)"
            );
        }
    }
    println!("snapshot restarts: {restarts}");
    println!("compaction saves failed: {failed_saves}");
    println!("seeds: {} passed, {failed} failed", args.seeds - failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::{run_seed, run_world};
    use crate::world::Broken;

    const REGRESSION_SEEDS: [u64; 4] = [7, 60, 67, 75];

    #[test]
    fn a_seed_replays_bit_for_bit() {
        let (first, again) =
            (run_seed(11, true, Broken::None, false), run_seed(11, true, Broken::None, false));
        assert_eq!(first.failure, None);
        assert_eq!(first.digest, again.digest);
        assert_eq!(first.trace, again.trace);
        assert!(first.trace.is_some_and(|t| t.contains("proposed")));
        assert_ne!(first.digest, run_seed(12, false, Broken::None, false).digest);
    }

    /// The faults and the workload issue 13 added do happen within these seeds (a change that
    /// stops drawing them fails here), and the clusters survive them.
    #[test]
    fn clusters_survive_the_faults_of_twenty_seeds() {
        let mut seen = std::collections::BTreeMap::new();
        for seed in 1..=20 {
            let outcome = run_seed(seed, true, Broken::None, false);
            assert_eq!(outcome.failure, None, "seed {seed}: {}", outcome.summary);
            let trace = outcome.trace.unwrap_or_default();
            for what in [
                ": EIO; the replica stops",
                ": ENOSPC; the replica stops",
                "fdatasync",
                "disk full for",
                "clock jumps",
                "clock stands still",
                "clock ticks every",
                "answered a retry of",
                "cut its log at offset",
                "crashes right after a cut",
                "a cut undone by the crash brings back",
                "leads the controller in term",
                "hands request",
                "answers client",
                "not the controller",
                "asking again",
                "again, skipped",
                "unsynced bytes lost in the crash",
                "compacted to index",
                "compacting to index",
                "a snapshot of index",
                "restarts its log at offset",
                "crashes right after a log restart",
                "lands in its log's restart: BeforeFlaggedSave",
                "finished its log's restart at offset",
            ] {
                *seen.entry(what).or_insert(0) += trace.matches(what).count();
            }
        }
        assert!(seen.values().all(|&n| n > 0), "not every fault happened: {seen:?}");
    }

    /// Replicas compact and leaders send snapshots to the followers their compaction left
    /// behind, which restart their logs: a change that stops compaction (or snapshots) fails here.
    #[test]
    fn followers_restart_their_logs_from_snapshots_within_ten_seeds() {
        let restarts: u64 = (1..=10).map(|seed| run_seed(seed, false, Broken::None, false).restarts).sum();
        assert!(restarts >= 10, "{restarts} log restarts from snapshots in seeds 1-10");
    }

    /// A follower restored from a snapshot campaigned before an entry after it was committed, and
    /// raft-rs, whose applied index `RaftGroup` had left below the snapshot, read the entries
    /// after it from the restarted log and panicked ("unexpected error getting unapplied entries
    /// ... Compacted"): after the snapshot was persisted (the applied index never moved to it), or
    /// while it was being persisted (a clock jump's ticks; seed 758 of an earlier version). The
    /// group now moves raft-rs's applied index to a persisted snapshot and holds its election
    /// clock until then. Without that, 13 of seeds 1-300 fail, these four among them.
    #[test]
    fn a_follower_restored_from_a_snapshot_may_campaign_at_once() {
        for seed in REGRESSION_SEEDS {
            let outcome = run_seed(seed, false, Broken::None, false);
            assert_eq!(outcome.failure, None, "seed {seed}");
            assert!(outcome.restarts > 0, "seed {seed} restarted no log");
        }
    }

    /// Quiet groups through the same faults: no invariant breaks, every group is quiet at the
    /// end, and some quiet followers had to be woken by their leader's death.
    #[test]
    fn quiet_clusters_survive_the_faults_of_twenty_seeds() {
        let mut woken = false;
        for seed in 1..=20 {
            let outcome = run_seed(seed, false, Broken::None, true);
            assert_eq!(outcome.failure, None, "seed {seed}: {}", outcome.summary);
            woken |= !outcome.summary.contains(" 0 quiet followers woken");
        }
        assert!(woken, "no quiet follower was ever woken by its leader's death");
    }

    /// Stop 17: a truncation left its unlinks of later segment files to a later sync of the
    /// directory, and an fdatasync of the cut file does not sync it. In seed 791 a node whose
    /// syncs are fdatasyncs cut its log at offset 713, synced the new leader's batch there, and
    /// crashed: the segment file at 714 came back, recovery attached it after that batch, and the
    /// replica refused to open (leader epoch 6 after 8). It is rare (1 of seeds 1–1500 under
    /// `--broken unsynced-unlinks`), so it is kept here rather than in the 40-seed sweep below.
    /// The partition now syncs the directory after those unlinks; the same seed passes. The run
    /// is the one found before the simulator compacted (compaction changes it).
    #[test]
    fn segments_a_cut_unlinked_stay_gone_after_a_crash() {
        let before = run_world(791, false, Broken::UnsyncedUnlinks, false, false);
        assert!(before.failure.as_deref().is_some_and(|f| f.contains("older than")), "{:?}", before.failure);
        let after = run_world(791, false, Broken::None, false, false);
        assert_eq!(after.failure, None);
        assert_eq!(run_seed(791, false, Broken::None, false).failure, None);
    }

    /// A follower restarted from a snapshot knows a batch below its new log start only from the
    /// producers the snapshot carries (the leader's real state, encoded and decoded by the
    /// broker's code); one that drops them writes a retry of that batch again once it leads. Seed
    /// 188 does so (a record acknowledged at two offsets; 3 of seeds 1-300 fail under the
    /// sabotage, the first at 188, so it is kept here rather than in the 40-seed sweep below);
    /// with the producers it passes.
    #[test]
    fn a_retry_below_a_restarted_log_start_is_a_duplicate() {
        let broken = run_seed(188, false, Broken::ForgetSnapshotProducers, false);
        assert!(broken.failure.as_deref().is_some_and(|f| f.contains("earlier at")), "{:?}", broken.failure);
        assert_eq!(run_seed(188, false, Broken::None, false).failure, None);
    }

    /// Stop 18: every node runs the controller group and applies its log with the broker's state
    /// machine; a node that applies its own topic change when it proposes it answers its client
    /// for an entry a new leader may replace. Seed 4 does so (an answer the final log never
    /// decides); without the sabotage it passes.
    #[test]
    fn an_answer_the_controller_log_never_committed_is_caught() {
        let broken = run_seed(4, false, Broken::ApplyAtPropose, false);
        assert!(
            broken.failure.as_deref().is_some_and(|f| f.contains("the final log decides None")),
            "{:?}",
            broken.failure
        );
        let healthy = run_seed(4, true, Broken::None, false);
        assert_eq!(healthy.failure, None);
        assert!(healthy.trace.is_some_and(|t| t.contains("controller #") && t.contains("answers client")));
    }

    /// Each broken variant must fail within the first seeds: a change that blinds the checker to
    /// one of these bugs fails this test.
    #[test]
    fn each_broken_variant_is_caught() {
        for broken in [
            Broken::AckBeforeSync,
            Broken::ServeUncommitted,
            Broken::SkipTruncation,
            Broken::IgnoreSyncErrors,
            Broken::ApplyAtPropose,
        ] {
            let caught =
                (1..=40).find_map(|seed| run_seed(seed, false, broken, false).failure.map(|f| (seed, f)));
            assert!(caught.is_some(), "{broken:?} passed 40 seeds unnoticed");
        }
    }
}
