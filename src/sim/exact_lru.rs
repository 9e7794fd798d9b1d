//! A fully associative LRU of fixed capacity with per-round pinning: the yardstick the
//! bucketed LRU is compared with in the simulator.

use crate::pool::Resolve;
use std::collections::{BTreeMap, HashMap};

/// Exact LRU over page ids; slots are numbered in order of first use.
#[derive(Debug, Clone)]
pub struct ExactLru {
    capacity: usize,
    /// page → (stamp, round of last use, slot).
    entries: HashMap<u32, (u64, u64, u32)>,
    /// stamp → page, oldest first.
    order: BTreeMap<u64, u32>,
    clock: u64,
    round: u64,
}

impl ExactLru {
    /// An empty cache of `capacity` slots.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            order: BTreeMap::new(),
            clock: 0,
            round: 1,
        }
    }

    /// Starts a round: the previous round's pins are released.
    pub fn begin_round(&mut self) {
        self.round += 1;
    }

    /// Resolves `page`: hit, miss (evicting the least recent unpinned page when full) or
    /// deferred (every resident page is pinned by this round).
    pub fn resolve(&mut self, page: u32) -> Resolve {
        self.clock += 1;
        if let Some(e) = self.entries.get_mut(&page) {
            self.order.remove(&e.0);
            e.0 = self.clock;
            e.1 = self.round;
            self.order.insert(self.clock, page);
            return Resolve::Hit(e.2);
        }
        let (slot, evicted) = if self.entries.len() < self.capacity {
            (self.entries.len() as u32, None)
        } else {
            let round = self.round;
            let victim = self
                .order
                .iter()
                .map(|(_, &p)| p)
                .find(|p| self.entries.get(p).is_some_and(|e| e.1 != round));
            let Some(v) = victim else { return Resolve::Deferred };
            let (stamp, _, slot) = self.entries.remove(&v).unwrap_or((0, 0, 0));
            self.order.remove(&stamp);
            (slot, Some(v))
        };
        self.entries.insert(page, (self.clock, self.round, slot));
        self.order.insert(self.clock, page);
        Resolve::Miss { slot, evicted }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recent_unpinned() {
        let mut c = ExactLru::new(2);
        assert!(matches!(c.resolve(1), Resolve::Miss { evicted: None, .. }));
        assert!(matches!(c.resolve(2), Resolve::Miss { evicted: None, .. }));
        assert_eq!(c.resolve(3), Resolve::Deferred);
        c.begin_round();
        assert!(matches!(c.resolve(1), Resolve::Hit(0)));
        assert_eq!(
            c.resolve(3),
            Resolve::Miss {
                slot: 1,
                evicted: Some(2)
            }
        );
    }
}
