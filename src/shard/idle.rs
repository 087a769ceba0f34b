//! When an idle shard gives its freed memory back (`crate::allocator`).
//!
//! Housekeeping feeds [`IdleRelease`] the shard's activity (`ShardStorage::activity`) once per
//! interval. A shard counts as idle when the value has not moved over a whole interval; memory is
//! released once per idle spell, then not again until the shard has been busy. Not while busy:
//! a forced release returns pages the allocator would soon reuse, and faulting them back in costs
//! more than the allocator's own delayed purge, which runs anyway while the shard allocates.

/// Remembers the activity seen at the last housekeeping run and whether this idle spell has
/// been released already.
#[derive(Debug, Default)]
pub(crate) struct IdleRelease {
    last: Option<(u64, u64, usize)>,
    released: bool,
}

impl IdleRelease {
    /// True when memory is to be released now: `activity` equals the last run's and nothing was
    /// released since it last changed.
    pub(crate) fn should_release(&mut self, activity: (u64, u64, usize)) -> bool {
        let unchanged = self.last == Some(activity);
        self.last = Some(activity);
        if !unchanged {
            self.released = false;
            return false;
        }
        let release = !self.released;
        self.released = true;
        release
    }
}

#[cfg(test)]
mod tests {
    use super::IdleRelease;

    #[test]
    fn releases_once_per_idle_spell_after_a_whole_quiet_interval() {
        let mut idle = IdleRelease::default();
        // The first run has nothing to compare with.
        assert!(!idle.should_release((0, 0, 0)));
        // Quiet for a whole interval: release once, then not again while it stays quiet.
        assert!(idle.should_release((0, 0, 0)));
        assert!(!idle.should_release((0, 0, 0)));
        assert!(!idle.should_release((0, 0, 0)));
        // Traffic (an insert), then a deletion (used bytes fall): busy both times.
        assert!(!idle.should_release((5, 0, 4096)));
        assert!(!idle.should_release((5, 0, 0)));
        // Quiet again: a new spell, released once.
        assert!(idle.should_release((5, 0, 0)));
        assert!(!idle.should_release((5, 0, 0)));
        // A miss alone is activity too.
        assert!(!idle.should_release((5, 1, 0)));
        assert!(idle.should_release((5, 1, 0)));
    }
}
