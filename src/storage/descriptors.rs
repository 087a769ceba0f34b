//! The descriptor budget: how many partitions this process can keep open under its
//! RLIMIT_NOFILE, counted the same way when a topic is created and when the broker starts.
//!
//! Owns the count of descriptors a partition holds while open (`PER_PARTITION`: its active
//! segment's file; sealed segments are opened only while read, from a small per-shard set
//! counted in the reserve) and the reserve kept for everything else (listeners, connections,
//! io_uring rings, transient files). Pure arithmetic over `getrlimit`; depends on libc only.

/// Descriptors an open partition holds, whether it was just created or reopened.
pub const PER_PARTITION: u64 = 1;
/// Sealed segments a shard keeps open for reads (least recently read closed first).
pub const SEALED_FILES_PER_SHARD: usize = 32;
/// Smallest reserve for listeners, connections, io_uring rings and transient files.
const RESERVED_MIN: u64 = 256;
/// The reserve grows with the limit: one descriptor in this many.
const RESERVED_SHARE: u64 = 16;

/// The process's descriptor limit and how much of it partitions may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescriptorBudget {
    /// The soft RLIMIT_NOFILE.
    pub limit: u64,
    /// Kept for everything but partitions.
    pub reserved: u64,
}

impl DescriptorBudget {
    /// The budget under the process's current soft RLIMIT_NOFILE; `None` if it cannot be read.
    pub fn current() -> Option<DescriptorBudget> {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes into the struct we own and has no other effect.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return None;
        }
        Some(DescriptorBudget::for_limit(limit.rlim_cur))
    }

    pub fn for_limit(limit: u64) -> DescriptorBudget {
        let reserved = (limit / RESERVED_SHARE).max(RESERVED_MIN).min(limit);
        DescriptorBudget { limit, reserved }
    }

    /// Most partitions the process can hold open.
    pub fn partitions_max(&self) -> u64 {
        (self.limit - self.reserved) / PER_PARTITION
    }

    /// Whether `partitions` in total fit.
    pub fn fits(&self, partitions: u64) -> bool {
        partitions <= self.partitions_max()
    }

    /// What an operator reads when partitions do not fit: the numbers and the way out.
    pub fn explain(&self, partitions: u64) -> String {
        format!(
            "{partitions} partitions need {} open files at {PER_PARTITION} per partition, and RLIMIT_NOFILE \
             {} less {} reserved for connections and other files leaves room for {}; raise the limit \
             (LimitNOFILE= in the systemd unit, `ulimit -n` in the shell that starts ringlog)",
            partitions * PER_PARTITION,
            self.limit,
            self.reserved,
            self.partitions_max()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_grows_with_the_limit_and_never_exceeds_it() {
        assert_eq!(DescriptorBudget::for_limit(20_000).reserved, 1_250);
        assert_eq!(DescriptorBudget::for_limit(20_000).partitions_max(), 18_750);
        assert_eq!(DescriptorBudget::for_limit(1_024).reserved, 256);
        assert_eq!(DescriptorBudget::for_limit(100).partitions_max(), 0);
        assert!(DescriptorBudget::for_limit(4_096).fits(3_840));
        assert!(!DescriptorBudget::for_limit(4_096).fits(3_841));
    }

    #[test]
    fn the_explanation_names_the_limit_and_the_way_out() {
        let text = DescriptorBudget::for_limit(4_096).explain(5_000);
        assert!(text.contains("RLIMIT_NOFILE 4096"), "{text}");
        assert!(text.contains("room for 3840"), "{text}");
        assert!(text.contains("LimitNOFILE"), "{text}");
    }
}
