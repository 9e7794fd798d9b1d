//! A free list of page slots with ownership tracking (no double frees, no leaks).

use crate::error::Tier;
use crate::{Error, Result};

/// Allocates page slots `0..capacity` of one tier.
#[derive(Debug, Clone)]
pub struct SlotAllocator {
    tier: Tier,
    free: Vec<u32>,
    owned: Vec<bool>,
}

impl SlotAllocator {
    /// A tier of `capacity` slots, all free.
    pub fn new(tier: Tier, capacity: usize) -> Self {
        // Pop order = ascending slot ids, which keeps a fresh pool's layout predictable.
        let free = (0..capacity as u32).rev().collect();
        Self {
            tier,
            free,
            owned: vec![false; capacity],
        }
    }

    /// Total slots.
    pub fn capacity(&self) -> usize {
        self.owned.len()
    }

    /// Free slots.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Slots in use.
    pub fn used_count(&self) -> usize {
        self.capacity() - self.free_count()
    }

    /// Takes `n` slots, all or nothing: [`Error::PoolExhausted`] (back-pressure) when fewer
    /// than `n` are free, with the allocator unchanged.
    pub fn alloc(&mut self, n: usize) -> Result<Vec<u32>> {
        if n > self.free.len() {
            return Err(Error::PoolExhausted {
                tier: self.tier,
                needed: n,
                free: self.free.len(),
            });
        }
        // In pop order (a fresh allocator hands out 0, 1, 2, ...).
        let mut taken = self.free.split_off(self.free.len() - n);
        taken.reverse();
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
                self.free.push(slot);
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
}
