//! A free list of page slots with ownership tracking (no double frees, no leaks), which
//! can hand out a preferred range of ids first (the cache's fast homes).

use crate::error::Tier;
use crate::{Error, Result};

/// Allocates page slots `0..capacity` of one tier.
#[derive(Debug, Clone)]
pub struct SlotAllocator {
    tier: Tier,
    /// Free ids `< preferred_from`.
    free: Vec<u32>,
    /// Free ids `>= preferred_from`, handed out first.
    free_preferred: Vec<u32>,
    preferred_from: usize,
    owned: Vec<bool>,
}

impl SlotAllocator {
    /// A tier of `capacity` slots, all free.
    pub fn new(tier: Tier, capacity: usize) -> Self {
        Self::with_preferred(tier, capacity, capacity)
    }

    /// A tier of `capacity` slots, all free, that hands out ids `preferred_from..capacity`
    /// before any lower id (ascending within each range in a fresh allocator).
    pub fn with_preferred(tier: Tier, capacity: usize, preferred_from: usize) -> Self {
        let preferred_from = preferred_from.min(capacity);
        // Pop order = ascending slot ids, which keeps a fresh pool's layout predictable.
        Self {
            tier,
            free: (0..preferred_from as u32).rev().collect(),
            free_preferred: (preferred_from as u32..capacity as u32).rev().collect(),
            preferred_from,
            owned: vec![false; capacity],
        }
    }

    /// Total slots.
    pub fn capacity(&self) -> usize {
        self.owned.len()
    }

    /// First preferred id (`capacity` when none is preferred).
    pub fn preferred_from(&self) -> usize {
        self.preferred_from
    }

    /// Free slots.
    pub fn free_count(&self) -> usize {
        self.free.len() + self.free_preferred.len()
    }

    /// Slots in use among the preferred ids (`preferred_from..capacity`).
    pub fn preferred_used(&self) -> usize {
        self.capacity() - self.preferred_from - self.free_preferred.len()
    }

    /// Slots in use.
    pub fn used_count(&self) -> usize {
        self.capacity() - self.free_count()
    }

    /// Takes `n` slots, all or nothing: [`Error::PoolExhausted`] (back-pressure) when fewer
    /// than `n` are free, with the allocator unchanged.
    pub fn alloc(&mut self, n: usize) -> Result<Vec<u32>> {
        if n > self.free_count() {
            return Err(Error::PoolExhausted {
                tier: self.tier,
                needed: n,
                free: self.free_count(),
            });
        }
        // In pop order (a fresh allocator hands out 0, 1, 2, ... of each range).
        let pref = n.min(self.free_preferred.len());
        let mut taken = self.free_preferred.split_off(self.free_preferred.len() - pref);
        taken.reverse();
        let mut rest = self.free.split_off(self.free.len() - (n - pref));
        rest.reverse();
        taken.extend(rest);
        for &s in &taken {
            self.owned[s as usize] = true;
        }
        Ok(taken)
    }

    /// Returns a slot; freeing a slot that is not owned is an error (a double free).
    pub fn free(&mut self, slot: u32) -> Result<()> {
        match self.owned.get_mut(slot as usize) {
            Some(o) if *o => {
                *o = false;
                if slot as usize >= self.preferred_from {
                    self.free_preferred.push(slot);
                } else {
                    self.free.push(slot);
                }
                Ok(())
            }
            _ => Err(Error::Invalid {
                op: "SlotAllocator::free",
                msg: format!(
                    "slot {slot} of the {} is not allocated (capacity {})",
                    self.tier,
                    self.capacity()
                ),
            }),
        }
    }

    /// Whether `slot` is currently allocated.
    pub fn is_owned(&self, slot: u32) -> bool {
        self.owned.get(slot as usize).copied().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_is_all_or_nothing_and_frees_are_checked() {
        let mut a = SlotAllocator::new(Tier::Host, 4);
        let s = a.alloc(3).unwrap();
        assert_eq!(a.free_count(), 1);
        assert!(matches!(
            a.alloc(2),
            Err(Error::PoolExhausted { needed: 2, free: 1, .. })
        ));
        assert_eq!(a.free_count(), 1);
        for x in s {
            a.free(x).unwrap();
        }
        assert!(a.free(0).is_err(), "double free must be rejected");
        assert_eq!(a.free_count(), 4);
    }

    #[test]
    fn preferred_ids_go_first_and_come_back_to_their_range() {
        let mut a = SlotAllocator::with_preferred(Tier::Host, 6, 4);
        assert_eq!(a.alloc(3).unwrap(), vec![4, 5, 0]);
        assert_eq!(a.preferred_used(), 2);
        a.free(5).unwrap();
        assert_eq!(a.preferred_used(), 1);
        // The freed preferred id is handed out again before the lower ones.
        assert_eq!(a.alloc(2).unwrap(), vec![5, 1]);
        assert!(matches!(
            a.alloc(3),
            Err(Error::PoolExhausted { needed: 3, free: 2, .. })
        ));
        assert_eq!(a.alloc(2).unwrap(), vec![2, 3]);
        assert_eq!(a.free_count(), 0);
        for s in 0..6 {
            assert!(a.is_owned(s));
        }
    }
}
