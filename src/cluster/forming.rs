//! A cluster still forming (issue #11): whether a topic change's replication factor can be
//! placed now, once more nodes have registered with the controller, or never.
//!
//! A node takes client requests as soon as it has started, before the controller's log holds
//! the registrations the controller's leader proposes for every node it hears from. A create of
//! factor 3 applied then is refused by `state::ControllerState` for want of nodes — rightly, the
//! log decides from what it holds — but the user met a permanent refusal of what succeeds a
//! second later. So the node that takes a create or a grow decides first, with `fit`, from the
//! registry as it applied it: the seed list names every controller voter, which all join, and
//! nodes beyond the seeds may have registered too, so the seeds and the registered nodes together
//! are a lower bound of the nodes the cluster will have. A factor within it is worth waiting for
//! (the caller waits, bounded, then answers the retriable `BrokerError::ClusterForming`); a factor
//! above it is refused at once.
//!
//! Why deciding on any node is sound: registrations only accumulate, and a node applies a prefix
//! of the log its leader commits, so a count this node applied holds when the change it then
//! proposes applies, on every node. The log's own check stays the final authority.
//!
//! Owns: `Fit` and `fit`. Pure: no IO, no clock, no configuration (the caller passes the seeds).

/// What a replication factor asks of the cluster as its registry stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Fit {
    /// As many nodes have registered as the factor: propose.
    Now,
    /// The seed list allows the factor, but these seed nodes have not registered yet.
    Forming { missing: Vec<u64> },
    /// More copies than the cluster can hold (or none): refused at once, for this reason.
    Never(String),
}

/// Whether `replication_factor` copies of `topic` can be placed over the `registered` nodes, will
/// be once the missing `seeds` register, or never can. Both lists are sorted node ids.
pub fn fit(topic: &str, replication_factor: u16, seeds: &[u64], registered: &[u64]) -> Fit {
    let factor = usize::from(replication_factor);
    let missing: Vec<u64> =
        seeds.iter().copied().filter(|id| registered.binary_search(id).is_err()).collect();
    let most = registered.len() + missing.len();
    if factor == 0 || factor > most {
        return Fit::Never(format!(
            "replication factor {replication_factor} for topic '{topic}': the cluster's seed list names nodes \
             {seeds:?} and nodes {registered:?} have registered with the controller, so a topic keeps at most \
             {most} copies; choose 1 to {most}",
        ));
    }
    if factor <= registered.len() {
        return Fit::Now;
    }
    // Not empty: the factor is above the registered nodes and within those and the seeds.
    Fit::Forming { missing }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_factor_the_seeds_allow_waits_for_registrations_and_one_beyond_them_never_fits() {
        let seeds = [1, 2, 3];
        // A cluster just started: nobody registered yet, then some.
        assert_eq!(fit("x", 3, &seeds, &[]), Fit::Forming { missing: vec![1, 2, 3] });
        assert_eq!(fit("x", 3, &seeds, &[1, 3]), Fit::Forming { missing: vec![2] });
        assert_eq!(fit("x", 2, &seeds, &[1, 3]), Fit::Now, "enough for two copies");
        assert_eq!(fit("x", 3, &seeds, &[1, 2, 3]), Fit::Now);
        assert_eq!(
            fit("x", 1, &seeds, &[]),
            Fit::Forming { missing: vec![1, 2, 3] },
            "one copy needs a node"
        );

        // Beyond the seeds: refused at once, naming what the cluster can hold.
        let Fit::Never(reason) = fit("x", 4, &seeds, &[1]) else { panic!("4 copies on 3 seeds") };
        assert!(reason.contains("replication factor 4 for topic 'x'"), "{reason}");
        assert!(reason.contains("choose 1 to 3"), "{reason}");
        assert!(matches!(fit("x", 0, &seeds, &[1, 2, 3]), Fit::Never(_)), "no copy at all");

        // Nodes beyond the seeds that registered count: the cluster holds more than its seeds.
        assert_eq!(fit("x", 4, &seeds, &[1, 2, 3, 4]), Fit::Now);
        assert_eq!(fit("x", 5, &seeds, &[1, 2, 4, 5, 6]), Fit::Now);
        assert_eq!(fit("x", 5, &seeds, &[1, 4, 5, 6]), Fit::Forming { missing: vec![2, 3] });
        assert_eq!(fit("x", 6, &seeds, &[1, 4, 5, 6]), Fit::Forming { missing: vec![2, 3] });
        assert!(matches!(fit("x", 7, &seeds, &[1, 4, 5, 6]), Fit::Never(_)));
    }

    /// `fit` answers `Now` exactly when the controller's log would place the factor over the same
    /// registry, so a change it lets through is never refused for want of nodes when it applies.
    #[test]
    fn fit_agrees_with_the_logs_own_check() {
        let seeds = [1, 2, 3];
        for registered in [&[][..], &[2], &[1, 2], &[1, 2, 3], &[1, 2, 3, 7]] {
            for factor in 0..=5u16 {
                let log_places = factor >= 1 && usize::from(factor) <= registered.len();
                assert_eq!(
                    fit("x", factor, &seeds, registered) == Fit::Now,
                    log_places,
                    "{factor} {registered:?}"
                );
            }
        }
    }
}
