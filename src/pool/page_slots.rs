//! Page slots of the host-tier address space, handed out one *page group* at a time: a
//! new logical page of a sequence takes one slot for each of the cache's `dirs` =
//! layers × KV heads directories. [`PageLayout`] says where those slots sit relative to
//! each other, which is where their K/V lands in the pools (slot `s` is row `s` of the
//! fast tier when it holds every page, and of the host tier). Plain Rust, no candle types.

use super::SlotAllocator;
use crate::error::Tier;
use crate::{Error, Result};

/// How a page group's slots are numbered ([`CacheConfig::page_layout`](crate::CacheConfig::page_layout)).
/// Both give the same outputs: only addresses differ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum PageLayout {
    /// A group takes `dirs` consecutive free slots, so one directory's consecutive pages
    /// are `dirs` slots apart (at the Llama-3-8B shape, 256 × 8 KB = 2 MB apart). The
    /// default, and the layout the trace simulator ([`crate::sim`]) models.
    #[default]
    Interleaved,
    /// Each directory owns a contiguous `1/dirs` of each slot range, and group `g` takes
    /// slot `start + d·G + g` of directory `d` (`G` = groups in the range). A sequence's
    /// pages of one (layer, KV head), allocated together, are then adjacent: one layer's
    /// K/V is `Hkv` dense runs instead of being spread over the whole pool. Each range
    /// (host pages, fast homes) holds `⌊len / dirs⌋` groups; up to `dirs − 1` slots at
    /// its end go unused.
    ByDirectory,
}

impl PageLayout {
    /// The layout named `name` (`interleaved` or `by-directory`).
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "interleaved" => Ok(Self::Interleaved),
            "by-directory" => Ok(Self::ByDirectory),
            _ => crate::invalid!(
                "PageLayout::from_name",
                "unknown page layout {name:?} (expected interleaved or by-directory)"
            ),
        }
    }
}

/// The host address space's slots (`0..capacity`; ids from `preferred_from` on are handed
/// out first), allocated a page group of `dirs` slots at a time in a [`PageLayout`].
#[derive(Debug, Clone)]
pub enum PageSlots {
    /// [`PageLayout::Interleaved`]: any `dirs` free slots, in pop order.
    Interleaved {
        /// The slots.
        slots: SlotAllocator,
        /// Slots per group.
        dirs: usize,
    },
    /// [`PageLayout::ByDirectory`].
    ByDirectory(DirectoryMajor),
}

impl PageSlots {
    /// Slots `0..capacity` in groups of `dirs`, ids `preferred_from..capacity` first.
    pub fn new(layout: PageLayout, capacity: usize, preferred_from: usize, dirs: usize) -> Self {
        match layout {
            PageLayout::Interleaved => Self::Interleaved {
                slots: SlotAllocator::with_preferred(Tier::Host, capacity, preferred_from),
                dirs,
            },
            PageLayout::ByDirectory => Self::ByDirectory(DirectoryMajor::new(capacity, preferred_from, dirs)),
        }
    }

    /// Takes one page group: `dirs` slots, the one of directory `d` at index `d`.
    /// [`Error::PoolExhausted`] (back-pressure) when no group is free, with nothing taken.
    pub fn alloc_group(&mut self) -> Result<Vec<u32>> {
        match self {
            Self::Interleaved { slots, dirs } => slots.alloc(*dirs),
            Self::ByDirectory(a) => a.alloc_group(),
        }
    }

    /// Returns a slot; a slot not allocated is an error (a double free).
    pub fn free(&mut self, slot: u32) -> Result<()> {
        match self {
            Self::Interleaved { slots, .. } => slots.free(slot),
            Self::ByDirectory(a) => a.free(slot),
        }
    }

    /// Slots `alloc_group` can still hand out (free groups × `dirs` when by directory).
    pub fn free_count(&self) -> usize {
        match self {
            Self::Interleaved { slots, .. } => slots.free_count(),
            Self::ByDirectory(a) => a.free_groups() * a.dirs,
        }
    }

    /// Slots in use.
    pub fn used_count(&self) -> usize {
        match self {
            Self::Interleaved { slots, .. } => slots.used_count(),
            Self::ByDirectory(a) => a.used,
        }
    }

    /// Slots in use among the preferred ids.
    pub fn preferred_used(&self) -> usize {
        match self {
            Self::Interleaved { slots, .. } => slots.preferred_used(),
            Self::ByDirectory(a) => a.preferred_used,
        }
    }

    /// Slot ids in all (`capacity` of [`new`](Self::new)).
    pub fn capacity(&self) -> usize {
        match self {
            Self::Interleaved { slots, .. } => slots.capacity(),
            Self::ByDirectory(a) => a.owned.len(),
        }
    }

    /// Slots that page groups can take among the preferred ids (`preferred`) or the rest:
    /// the range's length, rounded down to whole groups when by directory.
    pub fn usable(&self, preferred: bool) -> usize {
        match self {
            Self::Interleaved { slots, .. } => {
                let pref = slots.capacity() - slots.preferred_from();
                if preferred {
                    pref
                } else {
                    slots.capacity() - pref
                }
            }
            Self::ByDirectory(a) => a.ranges[usize::from(!preferred)].groups * a.dirs,
        }
    }

    /// Whether `slot` is allocated.
    pub fn is_owned(&self, slot: u32) -> bool {
        match self {
            Self::Interleaved { slots, .. } => slots.is_owned(slot),
            Self::ByDirectory(a) => a.owned.get(slot as usize).copied().unwrap_or(false),
        }
    }
}

/// One range of slot ids, `start..start + dirs·groups`, split by directory.
#[derive(Debug, Clone)]
struct Range {
    start: usize,
    groups: usize,
    /// Free group indices, popped ascending in a fresh range.
    free: Vec<u32>,
    /// Per group: its slots still allocated (a group is reused once all are back).
    held: Vec<u32>,
}

impl Range {
    fn new(start: usize, len: usize, dirs: usize) -> Self {
        let groups = len / dirs;
        Self {
            start,
            groups,
            free: (0..groups as u32).rev().collect(),
            held: vec![0; groups],
        }
    }

    /// (group, directory) of `slot`, if it lies in this range's groups.
    fn locate(&self, slot: usize, dirs: usize) -> Option<(usize, usize)> {
        let off = slot.checked_sub(self.start)?;
        (off < self.groups * dirs).then(|| (off % self.groups, off / self.groups))
    }
}

/// [`PageLayout::ByDirectory`]'s allocator: two ranges (the preferred ids, then the rest),
/// each split into `dirs` equal runs.
#[derive(Debug, Clone)]
pub struct DirectoryMajor {
    dirs: usize,
    /// `[preferred, rest]`.
    ranges: [Range; 2],
    owned: Vec<bool>,
    used: usize,
    preferred_used: usize,
}

impl DirectoryMajor {
    fn new(capacity: usize, preferred_from: usize, dirs: usize) -> Self {
        let dirs = dirs.max(1);
        let preferred_from = preferred_from.min(capacity);
        Self {
            dirs,
            ranges: [
                Range::new(preferred_from, capacity - preferred_from, dirs),
                Range::new(0, preferred_from, dirs),
            ],
            owned: vec![false; capacity],
            used: 0,
            preferred_used: 0,
        }
    }

    fn free_groups(&self) -> usize {
        self.ranges.iter().map(|r| r.free.len()).sum()
    }

    fn alloc_group(&mut self) -> Result<Vec<u32>> {
        let dirs = self.dirs;
        let Some(ri) = self.ranges.iter().position(|r| !r.free.is_empty()) else {
            return Err(Error::PoolExhausted {
                tier: Tier::Host,
                needed: dirs,
                free: 0,
            });
        };
        let r = &mut self.ranges[ri];
        let g = r.free.pop().expect("a free group") as usize;
        r.held[g] = dirs as u32;
        let slots: Vec<u32> = (0..dirs).map(|d| (r.start + d * r.groups + g) as u32).collect();
        for &s in &slots {
            self.owned[s as usize] = true;
        }
        self.used += dirs;
        if ri == 0 {
            self.preferred_used += dirs;
        }
        Ok(slots)
    }

    fn free(&mut self, slot: u32) -> Result<()> {
        let dirs = self.dirs;
        let s = slot as usize;
        let found = self
            .ranges
            .iter()
            .enumerate()
            .find_map(|(ri, r)| r.locate(s, dirs).map(|(g, _)| (ri, g)));
        match found {
            Some((ri, g)) if self.owned[s] => {
                self.owned[s] = false;
                self.used -= 1;
                if ri == 0 {
                    self.preferred_used -= 1;
                }
                let r = &mut self.ranges[ri];
                r.held[g] -= 1;
                if r.held[g] == 0 {
                    r.free.push(g as u32);
                }
                Ok(())
            }
            _ => Err(Error::Invalid {
                op: "PageSlots::free",
                msg: format!(
                    "slot {slot} of the host tier is not allocated (capacity {}, by directory)",
                    self.owned.len()
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_directory_groups_are_directory_runs() {
        // 3 dirs; preferred ids 14..20 (2 groups), the rest 0..14 (4 groups, 2 unused).
        let mut a = PageSlots::new(PageLayout::ByDirectory, 20, 14, 3);
        assert_eq!(a.free_count(), 6 * 3);
        assert_eq!(a.alloc_group().unwrap(), vec![14, 16, 18]);
        assert_eq!(a.alloc_group().unwrap(), vec![15, 17, 19]);
        assert_eq!(a.preferred_used(), 6);
        let g: Vec<Vec<u32>> = (0..4).map(|_| a.alloc_group().unwrap()).collect();
        assert_eq!(g[0], vec![0, 4, 8]);
        assert_eq!(g[3], vec![3, 7, 11]);
        assert!(matches!(
            a.alloc_group(),
            Err(Error::PoolExhausted { needed: 3, free: 0, .. })
        ));
        assert_eq!((a.used_count(), a.free_count()), (18, 0));
        assert_eq!((a.usable(true), a.usable(false)), (6, 12));
        // Slots 12, 13 are never handed out; freeing them is an error.
        assert!(a.free(12).is_err() && !a.is_owned(12));
        // A group comes back once all its slots are back.
        a.free(5).unwrap();
        assert!(a.free(5).is_err(), "double free must be rejected");
        assert_eq!(a.free_count(), 0);
        a.free(1).unwrap();
        a.free(9).unwrap();
        assert_eq!(a.free_count(), 3);
        assert_eq!(a.alloc_group().unwrap(), vec![1, 5, 9]);
        for s in [14, 16, 18] {
            a.free(s).unwrap();
        }
        assert_eq!(a.preferred_used(), 3);
        assert_eq!(a.alloc_group().unwrap(), vec![14, 16, 18], "preferred groups first");
    }

    #[test]
    fn interleaved_groups_are_consecutive_slots() {
        let mut a = PageSlots::new(PageLayout::Interleaved, 7, 7, 3);
        assert_eq!(a.alloc_group().unwrap(), vec![0, 1, 2]);
        assert_eq!(a.alloc_group().unwrap(), vec![3, 4, 5]);
        assert!(matches!(
            a.alloc_group(),
            Err(Error::PoolExhausted { needed: 3, free: 1, .. })
        ));
        assert_eq!((a.used_count(), a.free_count(), a.capacity()), (6, 1, 7));
        assert_eq!((a.usable(true), a.usable(false)), (0, 7));
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(PageLayout::from_name("by-directory").unwrap(), PageLayout::ByDirectory);
        assert_eq!(PageLayout::from_name("interleaved").unwrap(), PageLayout::Interleaved);
        let err = PageLayout::from_name("columnar").unwrap_err().to_string();
        assert!(err.contains("columnar") && err.contains("by-directory"), "{err}");
    }
}
