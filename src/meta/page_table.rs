//! Two-level page table: a small directory per (sequence, layer, KV head) points to
//! leaf blocks of [`LEAF_PAGES`] entries, each the host-tier slot of one logical page.
//! Leaves come from one shared arena and are allocated only when a page needs them, so
//! the table grows with the tokens that exist instead of
//! `max_batch × max_context/page × layers × heads` entries.

use crate::{Error, Result};
use foldhash::{HashMap, HashMapExt};

pub use crate::ops::LEAF_PAGES;

const EMPTY: u32 = u32::MAX;

#[derive(Debug, Clone, Default)]
struct SeqTables {
    /// `dirs[layer * kv_heads + head]` = leaf ids in page order.
    dirs: Vec<Vec<u32>>,
    /// Logical pages per directory (equal across a sequence's directories).
    pages: usize,
}

/// A directory entry that changed: directory `dir` of sequence `seq` now points at leaf
/// `leaf` (or [`NONE`](crate::ops::NONE): no leaf) for its `leaf_index`-th leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirChange {
    pub seq: u64,
    pub dir: u32,
    pub leaf_index: u32,
    pub leaf: u32,
}

/// A leaf entry that changed: entry `offset` (< [`LEAF_PAGES`]) of leaf `leaf` now holds
/// host slot `slot` (or [`NONE`](crate::ops::NONE)). With `offset` =
/// [`LeafChange::WHOLE_LEAF`], every entry of the leaf is now `NONE` (a removed
/// sequence's leaves: one record per leaf instead of one per entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafChange {
    pub leaf: u32,
    pub offset: u32,
    pub slot: u32,
}

impl LeafChange {
    /// The `offset` of a change that empties the whole leaf.
    pub const WHOLE_LEAF: u32 = u32::MAX;
}

/// The entries written since the last [`PageTables::take_changes`], in order (later
/// entries override earlier ones for the same position).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableChanges {
    pub dirs: Vec<DirChange>,
    pub leaves: Vec<LeafChange>,
}

impl TableChanges {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty() && self.leaves.is_empty()
    }
}

/// Logs a directory write when logging is on.
fn log_dir(log: &mut Option<TableChanges>, change: DirChange) {
    if let Some(log) = log {
        log.dirs.push(change);
    }
}

/// Logs a leaf write when logging is on.
fn log_leaf(log: &mut Option<TableChanges>, change: LeafChange) {
    if let Some(log) = log {
        log.leaves.push(change);
    }
}

/// All sequences' page tables.
#[derive(Debug, Clone)]
pub struct PageTables {
    dirs_per_seq: usize,
    leaves: Vec<[u32; LEAF_PAGES]>,
    free_leaves: Vec<u32>,
    seqs: HashMap<u64, SeqTables>,
    /// Change log, kept only once [`PageTables::track_changes`] was called.
    log: Option<TableChanges>,
}

impl PageTables {
    /// Tables for `layers × kv_heads` directories per sequence.
    pub fn new(layers: usize, kv_heads: usize) -> Self {
        Self {
            dirs_per_seq: layers * kv_heads,
            leaves: Vec::new(),
            free_leaves: Vec::new(),
            seqs: HashMap::new(),
            log: None,
        }
    }

    /// Reserves room for `leaves` leaves in the arena (address space only: no page of it
    /// is touched), so that a step whose sequences all start new leaves never moves the
    /// whole arena on the host.
    pub fn reserve_leaves(&mut self, leaves: usize) {
        self.leaves.reserve(leaves.saturating_sub(self.leaves.len()));
    }

    /// Starts logging every directory and leaf entry written, for mirroring the tables
    /// incrementally ([`DeviceTables::apply`](super::DeviceTables::apply)). The log starts
    /// with the current contents (every directory entry and every non-empty leaf entry),
    /// so that a mirror that starts empty catches up. Idempotent.
    pub fn track_changes(&mut self) {
        if self.log.is_some() {
            return;
        }
        let mut log = TableChanges::default();
        for (seq, dirs, _) in self.sequences() {
            for (d, leaves) in dirs.iter().enumerate() {
                for (i, &leaf) in leaves.iter().enumerate() {
                    log.dirs.push(DirChange {
                        seq,
                        dir: d as u32,
                        leaf_index: i as u32,
                        leaf,
                    });
                }
            }
        }
        for (leaf, entries) in self.leaves.iter().enumerate() {
            for (offset, &slot) in entries.iter().enumerate() {
                if slot != EMPTY {
                    log.leaves.push(LeafChange {
                        leaf: leaf as u32,
                        offset: offset as u32,
                        slot,
                    });
                }
            }
        }
        self.log = Some(log);
    }

    /// Whether [`track_changes`](Self::track_changes) is on.
    pub fn is_tracking(&self) -> bool {
        self.log.is_some()
    }

    /// The entries written since the previous call (empty when not tracking).
    pub fn take_changes(&mut self) -> TableChanges {
        self.log.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Puts `earlier` back in front of the log (a consumer that failed to apply it).
    pub(crate) fn restore_changes(&mut self, mut earlier: TableChanges) {
        if let Some(log) = self.log.as_mut() {
            earlier.dirs.append(&mut log.dirs);
            earlier.leaves.append(&mut log.leaves);
            *log = earlier;
        }
    }

    /// Registers an empty sequence.
    pub fn add_sequence(&mut self, seq: u64) {
        self.seqs.insert(
            seq,
            SeqTables {
                dirs: vec![Vec::new(); self.dirs_per_seq],
                pages: 0,
            },
        );
    }

    /// Whether `seq` is registered.
    pub fn contains(&self, seq: u64) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// Logical pages of `seq` (per directory).
    pub fn num_pages(&self, seq: u64) -> Result<usize> {
        Ok(self.seq(seq)?.pages)
    }

    fn seq(&self, seq: u64) -> Result<&SeqTables> {
        self.seqs.get(&seq).ok_or(Error::UnknownSequence(seq))
    }

    /// Appends one new logical page to every directory of `seq`; `slots[dir]` is its
    /// host slot in directory `dir = layer * kv_heads + head`.
    pub fn push_page(&mut self, seq: u64, slots: &[u32]) -> Result<()> {
        if slots.len() != self.dirs_per_seq {
            return Err(Error::Invalid {
                op: "PageTables::push_page",
                msg: format!(
                    "got {} slots, need one per directory ({})",
                    slots.len(),
                    self.dirs_per_seq
                ),
            });
        }
        let t = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq))?;
        let page = t.pages;
        let (leaf_idx, entry) = (page / LEAF_PAGES, page % LEAF_PAGES);
        for (d, (dir, &slot)) in t.dirs.iter_mut().zip(slots).enumerate() {
            if leaf_idx == dir.len() {
                let id = match self.free_leaves.pop() {
                    Some(id) => id,
                    None => {
                        self.leaves.push([EMPTY; LEAF_PAGES]);
                        (self.leaves.len() - 1) as u32
                    }
                };
                // Free leaves are all EMPTY already (pops clear entries), so a mirror
                // needs no reset of the reused leaf.
                self.leaves[id as usize] = [EMPTY; LEAF_PAGES];
                dir.push(id);
                log_dir(
                    &mut self.log,
                    DirChange {
                        seq,
                        dir: d as u32,
                        leaf_index: leaf_idx as u32,
                        leaf: id,
                    },
                );
            }
            let leaf = dir[leaf_idx];
            self.leaves[leaf as usize][entry] = slot;
            log_leaf(
                &mut self.log,
                LeafChange {
                    leaf,
                    offset: entry as u32,
                    slot,
                },
            );
        }
        t.pages += 1;
        Ok(())
    }

    /// Removes the last `n` logical pages of `seq` and returns their host slots.
    pub fn pop_pages(&mut self, seq: u64, n: usize) -> Result<Vec<u32>> {
        self.pop(seq, n, false)
    }

    /// [`pop_pages`](Self::pop_pages); with `whole_leaves` (all pages go) each leaf is
    /// logged once, emptied as a whole, when it is freed, instead of once per entry.
    fn pop(&mut self, seq: u64, n: usize, whole_leaves: bool) -> Result<Vec<u32>> {
        let t = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq))?;
        let n = n.min(t.pages);
        let mut out = Vec::with_capacity(n * self.dirs_per_seq);
        for _ in 0..n {
            t.pages -= 1;
            let (leaf_idx, entry) = (t.pages / LEAF_PAGES, t.pages % LEAF_PAGES);
            for (d, dir) in t.dirs.iter_mut().enumerate() {
                let id = dir[leaf_idx];
                let leaf = &mut self.leaves[id as usize];
                out.push(leaf[entry]);
                leaf[entry] = EMPTY;
                if !whole_leaves || entry == 0 {
                    let offset = if whole_leaves {
                        LeafChange::WHOLE_LEAF
                    } else {
                        entry as u32
                    };
                    log_leaf(
                        &mut self.log,
                        LeafChange {
                            leaf: id,
                            offset,
                            slot: EMPTY,
                        },
                    );
                }
                if entry == 0 {
                    self.free_leaves.push(dir.pop().unwrap_or_default());
                    log_dir(
                        &mut self.log,
                        DirChange {
                            seq,
                            dir: d as u32,
                            leaf_index: leaf_idx as u32,
                            leaf: EMPTY,
                        },
                    );
                }
            }
        }
        Ok(out)
    }

    /// Host slot of logical `page` in directory `dir` of `seq`.
    pub fn get(&self, seq: u64, dir: usize, page: usize) -> Result<u32> {
        let t = self.seq(seq)?;
        if dir >= t.dirs.len() || page >= t.pages {
            return Err(Error::Invalid {
                op: "PageTables::get",
                msg: format!(
                    "directory {dir} / page {page} out of range ({} dirs, {} pages)",
                    t.dirs.len(),
                    t.pages
                ),
            });
        }
        Ok(self.leaves[t.dirs[dir][page / LEAF_PAGES] as usize][page % LEAF_PAGES])
    }

    /// Appends the host slots of all pages of directory `dir` of `seq` to `out`, in order.
    pub fn extend_slots(&self, seq: u64, dir: usize, out: &mut Vec<u32>) -> Result<()> {
        let t = self.seq(seq)?;
        let mut left = t.pages;
        for &leaf in &t.dirs[dir] {
            let take = left.min(LEAF_PAGES);
            out.extend_from_slice(&self.leaves[leaf as usize][..take]);
            left -= take;
        }
        Ok(())
    }

    /// Forgets `seq` and returns all its host slots (to be freed by the caller).
    pub fn remove_sequence(&mut self, seq: u64) -> Result<Vec<u32>> {
        let pages = self.seq(seq)?.pages;
        let slots = self.pop(seq, pages, true)?;
        self.seqs.remove(&seq);
        Ok(slots)
    }

    /// Bytes in use: directory entries plus leaves in use (u32 entries each).
    pub fn bytes(&self) -> usize {
        let dir_entries: usize = self
            .seqs
            .values()
            .map(|t| t.dirs.iter().map(|d| d.len()).sum::<usize>())
            .sum();
        (dir_entries + self.leaves_in_use() * LEAF_PAGES) * std::mem::size_of::<u32>()
    }

    /// Bytes of the leaf arena, free leaves (kept for reuse) included.
    pub fn arena_bytes(&self) -> usize {
        self.leaves.len() * LEAF_PAGES * std::mem::size_of::<u32>()
    }

    /// Leaf blocks in use (allocated minus free).
    pub fn leaves_in_use(&self) -> usize {
        self.leaves.len() - self.free_leaves.len()
    }

    /// Directories per sequence (`layers × kv_heads`).
    pub fn dirs_per_seq(&self) -> usize {
        self.dirs_per_seq
    }

    /// The leaf arena (free leaves included), for mirroring the tables on a device.
    pub fn leaf_arena(&self) -> &[[u32; LEAF_PAGES]] {
        &self.leaves
    }

    /// Every sequence with its directories (leaf ids per directory, in page order) and
    /// its page count, ordered by sequence id.
    pub fn sequences(&self) -> Vec<(u64, &[Vec<u32>], usize)> {
        let mut v: Vec<(u64, &[Vec<u32>], usize)> = self
            .seqs
            .iter()
            .map(|(&s, t)| (s, t.dirs.as_slice(), t.pages))
            .collect();
        v.sort_by_key(|x| x.0);
        v
    }
}

/// Bytes of a flat page table with one u32 entry for every possible page:
/// `max_batch × ceil(max_context / page) × layers × heads × 4`.
pub fn flat_table_bytes(max_batch: usize, max_context: usize, page: usize, layers: usize, heads: usize) -> usize {
    max_batch * max_context.div_ceil(page) * layers * heads * std::mem::size_of::<u32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_get_pop_and_reuse_leaves() {
        let mut t = PageTables::new(2, 1);
        t.add_sequence(7);
        for p in 0..(LEAF_PAGES + 3) as u32 {
            t.push_page(7, &[p, 1000 + p]).unwrap();
        }
        assert_eq!(t.get(7, 1, LEAF_PAGES + 1).unwrap(), 1000 + LEAF_PAGES as u32 + 1);
        let mut all = Vec::new();
        t.extend_slots(7, 0, &mut all).unwrap();
        assert_eq!(all, (0..(LEAF_PAGES + 3) as u32).collect::<Vec<_>>());
        assert_eq!(t.leaves_in_use(), 4);
        let freed = t.remove_sequence(7).unwrap();
        assert_eq!(freed.len(), 2 * (LEAF_PAGES + 3));
        assert_eq!(t.leaves_in_use(), 0);
        assert!(t.get(7, 0, 0).is_err());
    }

    /// Removing a sequence logs each of its leaves once, emptied as a whole (the change
    /// log of a long sequence stays small); popping pages logs each entry.
    #[test]
    fn removal_logs_whole_leaves() {
        let mut t = PageTables::new(2, 1);
        t.add_sequence(7);
        t.track_changes();
        for p in 0..(LEAF_PAGES + 3) as u32 {
            t.push_page(7, &[p, 1000 + p]).unwrap();
        }
        t.take_changes();
        t.pop_pages(7, 2).unwrap();
        let popped = t.take_changes();
        assert_eq!(popped.leaves.len(), 2 * 2, "one entry per page and directory");
        assert!(popped
            .leaves
            .iter()
            .all(|c| c.offset < LEAF_PAGES as u32 && c.slot == EMPTY));
        t.remove_sequence(7).unwrap();
        let removed = t.take_changes();
        let mut whole: Vec<u32> = removed.leaves.iter().map(|c| c.leaf).collect();
        whole.sort_unstable();
        assert_eq!(whole, vec![0, 1, 2, 3], "two leaves in each of two directories");
        assert!(removed
            .leaves
            .iter()
            .all(|c| c.offset == LeafChange::WHOLE_LEAF && c.slot == EMPTY));
    }
}
