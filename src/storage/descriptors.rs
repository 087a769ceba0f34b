//! The descriptor budget: how many active segment files each shard may keep open under the
//! process's RLIMIT_NOFILE. Partitions hold a descriptor only while used (`partition/idle.rs`),
//! so the limit bounds how many partitions are open at once, not how many exist.
//!
//! Owns the split of the limit: a fixed reserve for listeners, io_uring rings, sealed segments
//! open for reads and transient files; of the rest, half for connections (each costs two: the
//! socket and the writer's duplicate) and half for active segment files, shared evenly by the
//! shards. Pure arithmetic over `getrlimit`; depends on libc only.

/// Sealed segments a shard keeps open for reads (least recently read closed first).
pub const SEALED_FILES_PER_SHARD: usize = 32;
/// Fewest active files a shard keeps open, whatever the limit: fewer would close and reopen
/// files on nearly every request of a modest workload.
pub const ACTIVE_FILES_PER_SHARD_MIN: usize = 16;
/// Smallest reserve for listeners, io_uring rings, sealed segments and transient files.
const RESERVED_MIN: u64 = 256;
/// The reserve grows with the limit: one descriptor in this many.
const RESERVED_SHARE: u64 = 16;

/// The process's descriptor limit and how it is shared out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescriptorBudget {
    /// The soft RLIMIT_NOFILE.
    pub limit: u64,
    /// Kept for everything but connections and active segment files.
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

    /// Active segment files all shards together keep open: half of what the reserve leaves.
    pub fn active_files_max(&self) -> u64 {
        (self.limit - self.reserved) / 2
    }

    /// Active segment files one of `shards` shards keeps open.
    pub fn active_files_per_shard(&self, shards: usize) -> usize {
        let per_shard = self.active_files_max() / shards.max(1) as u64;
        usize::try_from(per_shard).unwrap_or(usize::MAX).max(ACTIVE_FILES_PER_SHARD_MIN)
    }

    /// What an operator reads when the process ran out of descriptors anyway: the numbers and
    /// the way out.
    pub fn explain(&self) -> String {
        format!(
            "RLIMIT_NOFILE {} less {} reserved leaves {} descriptors for connections (two each) and \
             {} for the active segment files of partitions in use; raise the limit (LimitNOFILE= in \
             the systemd unit, `ulimit -n` in the shell that starts ringlog)",
            self.limit,
            self.reserved,
            self.limit - self.reserved - self.active_files_max(),
            self.active_files_max(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_grows_with_the_limit_and_never_exceeds_it() {
        assert_eq!(DescriptorBudget::for_limit(20_000).reserved, 1_250);
        assert_eq!(DescriptorBudget::for_limit(20_000).active_files_max(), 9_375);
        assert_eq!(DescriptorBudget::for_limit(20_000).active_files_per_shard(2), 4_687);
        assert_eq!(DescriptorBudget::for_limit(1_024).reserved, 256);
        assert_eq!(DescriptorBudget::for_limit(1_024).active_files_per_shard(2), 192);
        assert_eq!(DescriptorBudget::for_limit(100).active_files_max(), 0);
        assert_eq!(DescriptorBudget::for_limit(100).active_files_per_shard(2), ACTIVE_FILES_PER_SHARD_MIN);
    }

    #[test]
    fn the_explanation_names_the_limit_and_the_way_out() {
        let text = DescriptorBudget::for_limit(4_096).explain();
        assert!(text.contains("RLIMIT_NOFILE 4096"), "{text}");
        assert!(text.contains("1920 for the active segment files"), "{text}");
        assert!(text.contains("LimitNOFILE"), "{text}");
    }
}
