//! Per-shard tail cache: recent record batches of all the shard's partitions, as `Bytes`.
//!
//! Owns: one byte budget shared by every partition of a shard, least-recently-used eviction
//! across them, and hit/miss counters. A cached batch is a slice of some allocation (a copy made
//! for the cache, or a request's receive buffer) and keeps all of it alive: the caller says which
//! ([`Pin`]), the cache counts each pinned allocation once while any batch of it is cached, and
//! the budget bounds the pinned bytes, which are what the cache really holds. Written through on append, filled on read misses, so a
//! consumer near the end of the log is served without touching the disk and without copying
//! (`Bytes` clones). Shard-local: lives in a `RefCell` in `ShardStorage`, never crosses cores.
//! Depends on `bytes` and the counters' type in `metrics`. Holds whatever it is given: callers serve only below the high
//! watermark and drop entries on truncation and retention.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use bytes::Bytes;

pub use crate::metrics::CacheStats;

/// One allocation that cached batches are slices of: its size, and how many cached batches share it.
pub struct Pin {
    bytes: usize,
    holders: Cell<usize>,
}

impl Pin {
    pub fn new(bytes: usize) -> Rc<Pin> {
        Rc::new(Pin { bytes, holders: Cell::new(0) })
    }
}

struct CachedBatch {
    last_offset: i64,
    bytes: Bytes,
    pin: Rc<Pin>,
    /// Position in the LRU order (key in `TailCache::lru`).
    stamp: u64,
}

/// Bookkeeping per cached batch: its entries in a partition's map and in the LRU order, B-tree
/// nodes being from half to fully used (counted at 2/3), and its share of a `Pin`.
const ENTRY_BYTES: usize =
    (std::mem::size_of::<(i64, CachedBatch)>() + std::mem::size_of::<(u64, (u64, i64))>()) * 3 / 2;
/// A `Pin` in its `Rc`: two counters and two fields.
const PIN_BYTES: usize = 4 * std::mem::size_of::<usize>();

pub struct TailCache {
    budget_bytes: usize,
    used_bytes: usize,
    /// Bytes of the allocations cached batches are slices of, each counted once.
    pinned_bytes: usize,
    /// Allocations counted in `pinned_bytes`.
    pins: usize,
    clock: u64,
    /// partition id → batches by base offset.
    partitions: HashMap<u64, BTreeMap<i64, CachedBatch>>,
    /// stamp → (partition id, base offset); the smallest stamp is the least recently used.
    lru: BTreeMap<u64, (u64, i64)>,
    hits: u64,
    misses: u64,
}

impl TailCache {
    pub fn new(budget_bytes: usize) -> TailCache {
        TailCache {
            budget_bytes,
            used_bytes: 0,
            pinned_bytes: 0,
            pins: 0,
            clock: 0,
            partitions: HashMap::new(),
            lru: BTreeMap::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// Caches one batch, a slice of the allocation `pin` stands for. A batch whose allocation is
    /// larger than the whole budget is not cached.
    pub fn insert(
        &mut self,
        partition_id: u64,
        base_offset: i64,
        last_offset: i64,
        bytes: Bytes,
        pin: &Rc<Pin>,
    ) {
        debug_assert!(last_offset >= base_offset);
        debug_assert!(bytes.len() <= pin.bytes, "a batch is a slice of its allocation");
        if pin.bytes > self.budget_bytes {
            return;
        }
        self.clock += 1;
        let stamp = self.clock;
        self.used_bytes += bytes.len();
        self.hold(pin);
        let batches = self.partitions.entry(partition_id).or_default();
        if let Some(old) =
            batches.insert(base_offset, CachedBatch { last_offset, bytes, pin: pin.clone(), stamp })
        {
            self.used_bytes -= old.bytes.len();
            self.release(&old.pin);
            self.lru.remove(&old.stamp);
        }
        self.lru.insert(stamp, (partition_id, base_offset));
        while self.pinned_bytes > self.budget_bytes {
            let Some((_, (pid, base))) = self.lru.pop_first() else { break };
            self.remove_entry(pid, base);
        }
    }

    /// Appends to `out` the contiguous cached batches starting with the one containing `offset`,
    /// stopping before `end_offset` (the high watermark), after `max_bytes` (but always at least
    /// one batch) or at the first gap. Returns false (a miss) if the batch containing `offset` is
    /// not cached.
    pub fn read(
        &mut self,
        partition_id: u64,
        offset: i64,
        end_offset: i64,
        max_bytes: usize,
        out: &mut Vec<bytes::Bytes>,
    ) -> bool {
        let Some(batches) = self.partitions.get_mut(&partition_id) else {
            self.misses += 1;
            return false;
        };
        let start = match batches.range(..=offset).next_back() {
            Some((base, b)) if b.last_offset >= offset => *base,
            _ => {
                self.misses += 1;
                return false;
            }
        };
        let mut served_bytes = 0usize;
        let mut expected = start;
        for (base, batch) in batches.range_mut(start..) {
            if *base != expected || *base >= end_offset {
                break;
            }
            if !out.is_empty() && served_bytes + batch.bytes.len() > max_bytes {
                break;
            }
            served_bytes += batch.bytes.len();
            out.push(batch.bytes.clone());
            expected = batch.last_offset + 1;
            self.clock += 1;
            self.lru.remove(&batch.stamp);
            batch.stamp = self.clock;
            self.lru.insert(batch.stamp, (partition_id, *base));
        }
        if out.is_empty() {
            self.misses += 1;
            false
        } else {
            self.hits += 1;
            true
        }
    }

    /// Drops the partition's batches with base offset >= `offset` (truncation, rollback).
    pub fn remove_from(&mut self, partition_id: u64, offset: i64) {
        let bases: Vec<i64> = match self.partitions.get(&partition_id) {
            Some(b) => b.range(offset..).map(|(base, _)| *base).collect(),
            None => return,
        };
        for base in bases {
            self.remove_entry(partition_id, base);
        }
    }

    /// Drops up to `batches_max` of the partition's batches that end below `offset` (retention
    /// moved the log start); true while more remain. Bounded so that dropping the cached data of
    /// deleted segments (tens of thousands of small batches) can be spread between other tasks.
    pub fn remove_below(&mut self, partition_id: u64, offset: i64, batches_max: usize) -> bool {
        let bases: Vec<i64> = match self.partitions.get(&partition_id) {
            Some(b) => b
                .range(..offset)
                .filter(|(_, c)| c.last_offset < offset)
                .map(|(base, _)| *base)
                .take(batches_max.saturating_add(1))
                .collect(),
            None => return false,
        };
        let more = bases.len() > batches_max;
        for base in bases.into_iter().take(batches_max) {
            self.remove_entry(partition_id, base);
        }
        more
    }

    pub fn remove_partition(&mut self, partition_id: u64) {
        if let Some(batches) = self.partitions.remove(&partition_id) {
            for batch in batches.values() {
                self.used_bytes -= batch.bytes.len();
                self.release(&batch.pin);
                self.lru.remove(&batch.stamp);
            }
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits,
            misses: self.misses,
            used_bytes: self.used_bytes,
            budget_bytes: self.budget_bytes,
            batches: self.lru.len(),
        }
    }

    /// Changes whenever the shard's traffic or deletions touch the cache: every insert and every
    /// batch served advance `clock`, every miss `misses`, every removal lowers `used_bytes`. Equal
    /// values at two moments mean the shard appended, read and deleted nothing cached in between.
    pub fn activity(&self) -> (u64, u64, usize) {
        (self.clock, self.misses, self.used_bytes)
    }

    /// Bytes of the allocations the cached batches keep alive (at least `stats().used_bytes`).
    pub fn pinned_bytes(&self) -> usize {
        self.pinned_bytes
    }

    /// The cache's own bookkeeping, estimated from its entry count.
    pub fn index_bytes(&self) -> usize {
        self.lru.len() * ENTRY_BYTES + self.pins * PIN_BYTES
    }

    fn hold(&mut self, pin: &Pin) {
        if pin.holders.get() == 0 {
            self.pinned_bytes += pin.bytes;
            self.pins += 1;
        }
        pin.holders.set(pin.holders.get() + 1);
    }

    fn release(&mut self, pin: &Pin) {
        let holders = pin.holders.get() - 1;
        pin.holders.set(holders);
        if holders == 0 {
            self.pinned_bytes -= pin.bytes;
            self.pins -= 1;
        }
    }

    fn remove_entry(&mut self, partition_id: u64, base_offset: i64) {
        let Some(batches) = self.partitions.get_mut(&partition_id) else { return };
        let removed = batches.remove(&base_offset);
        if batches.is_empty() {
            self.partitions.remove(&partition_id);
        }
        if let Some(old) = removed {
            self.used_bytes -= old.bytes.len();
            self.release(&old.pin);
            self.lru.remove(&old.stamp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(len: usize) -> Bytes {
        Bytes::from(vec![7u8; len])
    }

    #[test]
    fn serves_contiguous_batches_below_end_with_at_least_one() {
        let mut c = TailCache::new(10_000);
        c.insert(1, 0, 4, b(100), &Pin::new(100));
        c.insert(1, 5, 5, b(100), &Pin::new(100));
        c.insert(1, 6, 9, b(100), &Pin::new(100));
        let mut out = Vec::new();
        assert!(c.read(1, 3, 10, 1, &mut out));
        assert_eq!(out.len(), 1, "a tiny max_bytes still yields one batch");
        out.clear();
        assert!(c.read(1, 3, 6, 10_000, &mut out));
        assert_eq!(out.len(), 2, "stops at the end offset (high watermark)");
        out.clear();
        assert!(!c.read(1, 10, 20, 10_000, &mut out));
        assert!(!c.read(2, 0, 20, 10_000, &mut out));
        assert_eq!(c.stats().hits, 2);
        assert_eq!(c.stats().misses, 2);
    }

    #[test]
    fn evicts_least_recently_used_across_partitions() {
        let mut c = TailCache::new(300);
        c.insert(1, 0, 0, b(100), &Pin::new(100));
        c.insert(2, 0, 0, b(100), &Pin::new(100));
        c.insert(1, 1, 1, b(100), &Pin::new(100));
        let mut out = Vec::new();
        assert!(c.read(1, 0, 10, 100, &mut out)); // touch partition 1 offset 0
        c.insert(3, 0, 0, b(100), &Pin::new(100)); // evicts partition 2's batch, the least recently used
        out.clear();
        assert!(!c.read(2, 0, 10, 100, &mut out));
        assert!(c.read(1, 0, 10, 100, &mut out));
        assert_eq!(c.stats().used_bytes, 300);
        c.insert(4, 0, 0, b(1000), &Pin::new(1000)); // larger than the budget: ignored
        assert_eq!(c.stats().batches, 3);
    }

    #[test]
    fn removal_by_range_and_partition_keeps_accounting() {
        let mut c = TailCache::new(10_000);
        for i in 0..10 {
            c.insert(1, i, i, b(10), &Pin::new(10));
        }
        c.insert(2, 0, 0, b(10), &Pin::new(10));
        c.remove_from(1, 7);
        assert!(c.remove_below(1, 2, 1), "one of two removed, more remain");
        assert_eq!(c.stats().batches, 7);
        assert!(!c.remove_below(1, 2, 1));
        assert!(!c.remove_below(1, 2, 1));
        assert_eq!(c.stats().batches, 6);
        assert_eq!(c.stats().used_bytes, 60);
        c.remove_partition(1);
        assert_eq!(c.stats().used_bytes, 10);
    }

    #[test]
    fn a_shared_allocation_counts_once_and_against_the_budget() {
        let mut c = TailCache::new(1000);
        let payload = b(300);
        let pin = Pin::new(600); // the receive buffer the payload came from is twice its size
        c.insert(1, 0, 0, payload.slice(0..100), &pin);
        c.insert(1, 1, 1, payload.slice(100..300), &pin);
        assert_eq!((c.stats().used_bytes, c.pinned_bytes()), (300, 600));
        assert!(c.index_bytes() > 0);
        c.insert(2, 0, 0, b(300), &Pin::new(300));
        assert_eq!(c.pinned_bytes(), 900);
        // Over budget by pinned bytes (1,200 > 1,000) though not by batch bytes (900): evicting
        // the least recently used batch frees nothing while its neighbour pins the allocation,
        // so both go.
        c.insert(3, 0, 0, b(300), &Pin::new(300));
        assert_eq!(c.stats().batches, 2);
        assert_eq!((c.stats().used_bytes, c.pinned_bytes()), (600, 600));
        let mut out = Vec::new();
        assert!(!c.read(1, 1, 10, 1000, &mut out));
        c.remove_partition(2);
        c.remove_below(3, 1, 10);
        assert_eq!((c.stats().used_bytes, c.pinned_bytes(), c.index_bytes()), (0, 0, 0));
    }
}
