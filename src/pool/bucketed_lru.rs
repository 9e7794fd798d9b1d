//! Set-associative (bucketed) LRU that maps logical pages (their host-tier slot ids) to
//! fast-tier slots: a page hashes to one bucket of `ways` slots; a hit returns its slot,
//! a miss evicts the bucket's least recently used way that is not pinned by the current
//! round. With per-request budgets ([`BudgetTracker`]) the victim is chosen among the
//! requester's own pages when it is over budget, then among pages of requests over their
//! budgets, then by plain LRU. This is the reference and the CPU implementation of the
//! policy; the trace-driven simulator (`spinkv::sim`) runs this same code.
//!
//! Budget classes use a *snapshot* of the per-owner resident counts taken when the round
//! begins ([`BucketedLru::begin_round`], and at construction), not the live counts: an
//! eviction in one bucket does not change how another bucket of the same round classifies
//! its ways. A round's outcome therefore does not depend on the order in which different
//! buckets are processed (only the order of requests within one bucket matters), which
//! lets the GPU version ([`DeviceLru`](crate::tiered::device_lru::DeviceLru)) resolve all
//! buckets in parallel and still match this code exactly.

use super::budget::BudgetTracker;
use std::collections::HashMap;

/// Outcome of resolving one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    /// Resident in this fast slot.
    Hit(u32),
    /// Not resident: it now owns this fast slot (fetch it); `evicted` lost the slot.
    Miss {
        /// The fast slot to fill.
        slot: u32,
        /// The page evicted from that slot, if any.
        evicted: Option<u32>,
    },
    /// Every way of its bucket is pinned by this round: retry in the next round.
    Deferred,
}

const EMPTY: u32 = u32::MAX;

/// Fast-tier residency: `buckets × ways` slots; slot id = `bucket * ways + way`.
#[derive(Debug, Clone)]
pub struct BucketedLru {
    buckets: usize,
    ways: usize,
    tags: Vec<u32>,
    stamps: Vec<u64>,
    pinned: Vec<u64>,
    owners: Vec<u64>,
    resident_by_owner: HashMap<u64, usize>,
    /// `resident_by_owner` as of the start of the round (budget classes read this).
    resident_snapshot: HashMap<u64, usize>,
    clock: u64,
    round: u64,
}

pub use crate::ops::lru_resolve::bucket_index;

/// Owner of pages resolved without a request (plain [`BucketedLru::resolve`]).
pub const NO_OWNER: u64 = u64::MAX;

impl BucketedLru {
    /// An empty cache of `buckets × ways` slots (`buckets, ways >= 1`).
    pub fn new(buckets: usize, ways: usize) -> Self {
        let n = buckets.max(1) * ways.max(1);
        Self {
            buckets: buckets.max(1),
            ways: ways.max(1),
            tags: vec![EMPTY; n],
            stamps: vec![0; n],
            pinned: vec![0; n],
            owners: vec![NO_OWNER; n],
            resident_by_owner: HashMap::new(),
            resident_snapshot: HashMap::new(),
            clock: 0,
            round: 1,
        }
    }

    /// Total fast slots.
    pub fn capacity(&self) -> usize {
        self.tags.len()
    }

    /// Ways per bucket.
    pub fn ways(&self) -> usize {
        self.ways
    }

    /// The bucket of a page: Fibonacci hashing of its id (the fractional part of
    /// `id·φ` scaled to the bucket count), which spreads consecutive ids — a sequence's
    /// pages — almost evenly over the buckets.
    pub fn bucket_of(&self, page: u32) -> usize {
        bucket_index(page, self.buckets)
    }

    /// Starts a new round: pins of the previous round are released and the per-owner
    /// resident counts are snapshotted for the round's budget classes.
    pub fn begin_round(&mut self) {
        self.round += 1;
        self.resident_snapshot.clone_from(&self.resident_by_owner);
    }

    /// The fast slot holding `page`, without touching recency.
    pub fn lookup(&self, page: u32) -> Option<u32> {
        let b = self.bucket_of(page) * self.ways;
        (b..b + self.ways).find(|&s| self.tags[s] == page).map(|s| s as u32)
    }

    /// Resolves `page` for the current round and pins its slot until the next round
    /// (plain LRU, no budgets).
    pub fn resolve(&mut self, page: u32) -> Resolve {
        self.resolve_with(page, NO_OWNER, None)
    }

    /// Resolves `page` of request `owner` under the budgets of `budgets`: on a miss the
    /// victim is, among the bucket's unpinned ways, an empty way, else the least recently
    /// used page of a request at or over its budget (the requester included), else the
    /// least recently used page. Budgets thus protect each request's pages up to its
    /// budget; when every request is over budget the policy is plain LRU.
    ///
    /// "At or over its budget" compares the budget with the owner's resident count as of
    /// the last [`begin_round`](Self::begin_round) (the round's snapshot), not the live
    /// count, so evictions earlier in the round do not reclassify ways of other buckets.
    pub fn resolve_for(&mut self, page: u32, owner: u64, budgets: &BudgetTracker) -> Resolve {
        self.resolve_with(page, owner, Some(budgets))
    }

    fn resolve_with(&mut self, page: u32, owner: u64, budgets: Option<&BudgetTracker>) -> Resolve {
        self.clock += 1;
        let b = self.bucket_of(page) * self.ways;
        if let Some(s) = (b..b + self.ways).find(|&s| self.tags[s] == page) {
            self.stamps[s] = self.clock;
            self.pinned[s] = self.round;
            return Resolve::Hit(s as u32);
        }
        let over = |o: u64| -> bool {
            match budgets {
                Some(t) if o != NO_OWNER => self.resident_snapshot.get(&o).copied().unwrap_or(0) >= t.budget(o),
                _ => false,
            }
        };
        let class = |s: usize| -> u8 {
            if self.tags[s] == EMPTY {
                0
            } else if over(self.owners[s]) {
                1
            } else {
                2
            }
        };
        let victim = (b..b + self.ways)
            .filter(|&s| self.pinned[s] != self.round)
            .min_by_key(|&s| (class(s), if self.tags[s] == EMPTY { 0 } else { self.stamps[s] }));
        match victim {
            None => Resolve::Deferred,
            Some(s) => {
                let evicted = (self.tags[s] != EMPTY).then_some(self.tags[s]);
                if evicted.is_some() {
                    self.release_owner(self.owners[s]);
                }
                self.tags[s] = page;
                self.owners[s] = owner;
                *self.resident_by_owner.entry(owner).or_insert(0) += 1;
                self.stamps[s] = self.clock;
                self.pinned[s] = self.round;
                Resolve::Miss {
                    slot: s as u32,
                    evicted,
                }
            }
        }
    }

    fn release_owner(&mut self, owner: u64) {
        if let Some(n) = self.resident_by_owner.get_mut(&owner) {
            *n -= 1;
            if *n == 0 {
                self.resident_by_owner.remove(&owner);
            }
        }
    }

    /// Fast slots currently held by `owner`'s pages.
    pub fn resident_of(&self, owner: u64) -> usize {
        self.resident_by_owner.get(&owner).copied().unwrap_or(0)
    }

    /// Forgets `page` (its home slot was freed); its fast slot becomes empty.
    pub fn invalidate(&mut self, page: u32) {
        if let Some(s) = self.lookup(page) {
            let s = s as usize;
            self.release_owner(self.owners[s]);
            self.tags[s] = EMPTY;
            self.owners[s] = NO_OWNER;
            self.stamps[s] = 0;
        }
    }

    /// The pages currently resident.
    pub fn resident_pages(&self) -> impl Iterator<Item = u32> + '_ {
        self.tags.iter().copied().filter(|&t| t != EMPTY)
    }

    /// Pages currently resident.
    pub fn resident_count(&self) -> usize {
        self.tags.iter().filter(|&&t| t != EMPTY).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_miss_evict_and_defer() {
        let mut c = BucketedLru::new(1, 2);
        assert!(matches!(c.resolve(10), Resolve::Miss { evicted: None, .. }));
        assert!(matches!(c.resolve(11), Resolve::Miss { evicted: None, .. }));
        assert_eq!(c.resolve(12), Resolve::Deferred, "both ways pinned this round");
        c.begin_round();
        assert!(matches!(c.resolve(11), Resolve::Hit(_)));
        // 10 is now least recent and unpinned.
        assert!(matches!(c.resolve(12), Resolve::Miss { evicted: Some(10), .. }));
        assert_eq!(c.lookup(10), None);
        c.invalidate(12);
        assert_eq!(c.resident_count(), 1);
    }

    #[test]
    fn over_budget_owner_evicts_its_own_pages_first() {
        // Every eviction below is the first of its round, so the round's snapshot of the
        // resident counts equals the live counts and the expected values are the same as
        // before the snapshot rule (see `budget_classes_use_the_round_snapshot`).
        use crate::pool::budget::{BudgetPolicy, BudgetTracker};
        let mut c = BucketedLru::new(1, 4);
        let mut t = BudgetTracker::new(BudgetPolicy::FixedEqual, 4);
        t.observe(1, []);
        t.observe(2, []);
        t.end_step(); // budgets 2 and 2
        for p in [10, 11] {
            assert!(matches!(c.resolve_for(p, 1, &t), Resolve::Miss { evicted: None, .. }));
        }
        c.begin_round();
        assert!(matches!(c.resolve_for(20, 2, &t), Resolve::Miss { evicted: None, .. }));
        c.begin_round();
        // An empty way is used first, whoever asks.
        assert!(matches!(c.resolve_for(12, 1, &t), Resolve::Miss { evicted: None, .. }));
        assert_eq!((c.resident_of(1), c.resident_of(2)), (3, 1));
        c.begin_round();
        // Bucket full. Request 2 (under budget) evicts a page of request 1 (over budget),
        // its least recent (10), although 20 is older than 11 and 12.
        let _ = c.resolve_for(11, 1, &t);
        let _ = c.resolve_for(12, 1, &t);
        c.begin_round();
        assert!(matches!(
            c.resolve_for(21, 2, &t),
            Resolve::Miss { evicted: Some(10), .. }
        ));
        c.begin_round();
        // Both at budget: plain LRU (20 is now the least recent).
        assert!(matches!(
            c.resolve_for(13, 1, &t),
            Resolve::Miss { evicted: Some(20), .. }
        ));
        c.invalidate(13);
        assert_eq!(c.resident_of(1), 2);
    }

    #[test]
    fn budget_classes_use_the_round_snapshot() {
        use crate::pool::budget::{BudgetPolicy, BudgetTracker};
        let mut c = BucketedLru::new(2, 2);
        let mut t = BudgetTracker::new(BudgetPolicy::Unlimited, 4);
        t.set_budget(1, 3);
        t.set_budget(2, 100);
        let in_bucket = |b: usize| (100u32..).filter(move |&p| bucket_index(p, 2) == b);
        let b0: Vec<u32> = in_bucket(0).take(3).collect();
        let b1: Vec<u32> = in_bucket(1).take(3).collect();
        let (q, a, b, cc) = (b1[0], b0[0], b0[1], b1[1]);
        // Owner 2's q is the least recent page of bucket 1; owner 1 holds 3 pages.
        let _ = c.resolve_for(q, 2, &t);
        let _ = c.resolve_for(a, 1, &t);
        let _ = c.resolve_for(b, 1, &t);
        let _ = c.resolve_for(cc, 1, &t);
        c.begin_round();
        // Owner 1 is at its budget (3 of 3) in the snapshot: owner 2 evicts its pages.
        assert!(matches!(c.resolve_for(b0[2], 2, &t), Resolve::Miss { evicted: Some(p), .. } if p == a));
        assert_eq!(c.resident_of(1), 2);
        // Owner 1 now holds 2 < 3 pages, but the round's snapshot still says 3: bucket 1
        // evicts owner 1's cc, not the older q (with live counts it would evict q).
        assert!(matches!(c.resolve_for(b1[2], 2, &t), Resolve::Miss { evicted: Some(p), .. } if p == cc));
        c.begin_round();
        // The next round sees 1 page of owner 1: plain LRU among the unpinned ways.
        assert_eq!(c.resident_of(1), 1);
    }
}
