//! Set-associative (bucketed) LRU that maps logical pages (their host-tier slot ids) to
//! fast-tier slots: a page hashes to one bucket of `ways` slots; a hit returns its slot,
//! a miss evicts the bucket's least recently used way that is not pinned by the current
//! round. The same policy runs on the GPU (issue: tiered GPU cache); this is the
//! reference and the CPU implementation.

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
    clock: u64,
    round: u64,
}

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
        let frac = (page as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        ((frac * self.buckets as u64) >> 32) as usize
    }

    /// Starts a new round: pins of the previous round are released.
    pub fn begin_round(&mut self) {
        self.round += 1;
    }

    /// The fast slot holding `page`, without touching recency.
    pub fn lookup(&self, page: u32) -> Option<u32> {
        let b = self.bucket_of(page) * self.ways;
        (b..b + self.ways).find(|&s| self.tags[s] == page).map(|s| s as u32)
    }

    /// Resolves `page` for the current round and pins its slot until the next round.
    pub fn resolve(&mut self, page: u32) -> Resolve {
        self.clock += 1;
        let b = self.bucket_of(page) * self.ways;
        if let Some(s) = (b..b + self.ways).find(|&s| self.tags[s] == page) {
            self.stamps[s] = self.clock;
            self.pinned[s] = self.round;
            return Resolve::Hit(s as u32);
        }
        let victim = (b..b + self.ways)
            .filter(|&s| self.pinned[s] != self.round)
            .min_by_key(|&s| if self.tags[s] == EMPTY { 0 } else { self.stamps[s] });
        match victim {
            None => Resolve::Deferred,
            Some(s) => {
                let evicted = (self.tags[s] != EMPTY).then_some(self.tags[s]);
                self.tags[s] = page;
                self.stamps[s] = self.clock;
                self.pinned[s] = self.round;
                Resolve::Miss {
                    slot: s as u32,
                    evicted,
                }
            }
        }
    }

    /// Forgets `page` (its home slot was freed); its fast slot becomes empty.
    pub fn invalidate(&mut self, page: u32) {
        if let Some(s) = self.lookup(page) {
            self.tags[s as usize] = EMPTY;
            self.stamps[s as usize] = 0;
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
}
