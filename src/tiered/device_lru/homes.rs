//! Fast homes of a bucketed [`DeviceLru`]: ids past the host tier's whose pages live in
//! fixed fast slots after the buckets' (see the parent module and [`FastHomes`]).

use super::{DeviceLru, FastHomes};
use crate::ops::NONE;
use crate::Result;

impl DeviceLru {
    /// Gives ids `host_slots..host_slots + count` a home in the fast tier: fast slots
    /// `capacity()..capacity() + count`, after the buckets' (see the module docs). Call it
    /// before the first round. Not for a direct-mapped LRU, whose every id already has a
    /// fast slot.
    pub fn with_fast_homes(mut self, count: usize) -> Result<Self> {
        const WOP: &str = "DeviceLru::with_fast_homes";
        if self.direct {
            crate::invalid!(
                WOP,
                "a direct-mapped LRU of {} slots has no room for fast homes",
                self.host_slots
            );
        }
        if self.host_slots + count >= NONE as usize || self.capacity() + count >= NONE as usize {
            crate::invalid!(
                WOP,
                "{count} fast homes after {} host slots and {} bucketed fast slots overflow u32 ids",
                self.host_slots,
                self.capacity()
            );
        }
        self.homes.count = count as u32;
        Ok(self)
    }

    /// The ids with a home in the fast tier ([`with_fast_homes`](Self::with_fast_homes)).
    pub fn fast_homes(&self) -> FastHomes {
        self.homes
    }

    /// Fast slots in all: the bucketed ones plus the fast homes (direct: one per id). The
    /// fast pool has this many pages.
    pub fn fast_slots(&self) -> usize {
        self.capacity() + self.homes.count as usize
    }

    /// The fast slot that always holds `id`'s page while it is allocated: its own number
    /// in a direct-mapped LRU, its fast home if it has one, else `None` (the page is
    /// resident only while the bucketed LRU keeps it).
    pub fn fixed_slot(&self, id: u32) -> Option<u32> {
        if self.direct {
            return (id != NONE && (id as usize) < self.host_slots).then_some(id);
        }
        self.homes.slot(id)
    }
}
