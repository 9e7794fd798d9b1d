//! The two-level page tables mirrored on a device: a directory matrix
//! `[rows, max_leaves]` (one row per (sequence, layer, KV head), leaf ids, `NONE`
//! padded) and the leaf arena `[leaves, 64]` of host slots. [`page_slots`] translates
//! (row, logical page) pairs to slots on the device — two dependent loads per entry —
//! so that selections made on the GPU become page lists without a trip to the host.
//!
//! Two ways to fill it: [`DeviceTables::upload`] copies a snapshot sized to the tables;
//! [`DeviceTables::with_capacity`] preallocates fixed-size tables that
//! [`DeviceTables::apply`] keeps in step with a [`PageTables`] by writing only the entries
//! that changed (its change log, [`PageTables::take_changes`]): one host-to-device copy,
//! from pinned staging into a device buffer the tables keep ([`StagedUpload`]), of the
//! (flat index, value) pairs of both tables and the lists of whole rows to empty (a
//! removed sequence's directory rows and leaves); then one fill launch per table for the
//! emptied rows and one scatter launch per table. The host waits for the device only
//! when it runs more applies ahead of it than the staging ring holds
//! ([`RING`](crate::ops::upload::RING)). Sequences get directory rows by
//! [`DeviceTables::add_sequence`] (freed rows are reused).

use super::page_table::{LeafChange, PageTables, LEAF_PAGES};
use crate::ops::page_table::{fill_rows, scatter};
use crate::ops::{page_slots, StagedUpload, NONE};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

const APPLY: &str = "DeviceTables::apply";
const ROWS: &str = "DeviceTables::add_sequence";

/// A device copy of [`PageTables`] (see the module docs).
#[derive(Debug, Clone)]
pub struct DeviceTables {
    /// `[rows, max_leaves]` u32 leaf ids (`NONE` past a directory's end).
    pub directory: Tensor,
    /// `[leaves, 64]` u32 host slots (`NONE` for unused entries).
    pub leaves: Tensor,
    rows: HashMap<u64, u32>,
    dirs_per_seq: usize,
    /// First rows of freed row blocks (`dirs_per_seq` rows each), reused first.
    free_rows: Vec<u32>,
    /// First row never handed out.
    next_row: u32,
    /// Directory rows freed by [`remove_sequence`](Self::remove_sequence), cleared by the
    /// next [`apply`](Self::apply).
    pending_rows: Vec<u32>,
    /// One bit per leaf-arena entry, all clear between applies: the entries an apply has
    /// already taken its (newest) write of (a hash set cost half of a step where 64
    /// sequences start a page together).
    taken: Vec<u64>,
    /// The applies' (index, value) pairs on their way to the device.
    stage: Stage,
}

/// A device buffer of u32 words and the staged upload that writes it (created on first
/// use; a clone of the tables starts without, and stages through buffers of its own).
#[derive(Debug, Default)]
struct Stage {
    upload: Option<StagedUpload>,
    buf: Option<Tensor>,
}

impl Clone for Stage {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl Stage {
    /// `words` written into the first `words.len()` words of the buffer on `device` (grown
    /// first when too small): one host-to-device copy. Returns the buffer.
    fn write(&mut self, words: &[u32], device: &Device) -> Result<Tensor> {
        let upload = match self.upload.as_mut() {
            Some(u) => u,
            None => self.upload.insert(StagedUpload::new(APPLY, words.len(), device)?),
        };
        let buf = match &self.buf {
            Some(b) if b.dims()[0] >= words.len() => b.clone(),
            old => {
                let len = words.len().max(2 * old.as_ref().map_or(0, |b| b.dims()[0])).max(256);
                let b = Tensor::zeros(len, candle_core::DType::U32, device)?;
                self.buf = Some(b.clone());
                b
            }
        };
        upload.write(&buf, words)?;
        Ok(buf)
    }
}

impl DeviceTables {
    /// Empty tables (every entry `NONE`) on `device` for incremental updates by
    /// [`apply`](Self::apply): `directory` `[max_rows, max_leaves_per_row]` (so at most
    /// `max_rows / dirs_per_seq` sequences of at most `max_leaves_per_row · 64` pages) and
    /// `leaves` `[arena_leaves, 64]` (leaf ids of the mirrored [`PageTables`] must stay
    /// below `arena_leaves`). `dirs_per_seq` is `layers × kv_heads`.
    pub fn with_capacity(
        max_rows: usize,
        max_leaves_per_row: usize,
        arena_leaves: usize,
        dirs_per_seq: usize,
        device: &Device,
    ) -> Result<Self> {
        let fits = |a: usize, b: usize| a.checked_mul(b).is_some_and(|n| n < NONE as usize);
        if max_rows == 0
            || max_leaves_per_row == 0
            || arena_leaves == 0
            || dirs_per_seq == 0
            || !fits(max_rows, max_leaves_per_row)
            || !fits(arena_leaves, LEAF_PAGES)
        {
            crate::invalid!(
                "DeviceTables::with_capacity",
                "max_rows ({max_rows}), max_leaves_per_row ({max_leaves_per_row}), arena_leaves \
                 ({arena_leaves}) and dirs_per_seq ({dirs_per_seq}) must be >= 1, with \
                 [{max_rows}, {max_leaves_per_row}] and [{arena_leaves}, {LEAF_PAGES}] tables of fewer than 2^32 entries"
            );
        }
        Ok(Self {
            directory: Tensor::full(NONE, (max_rows, max_leaves_per_row), device)?,
            leaves: Tensor::full(NONE, (arena_leaves, LEAF_PAGES), device)?,
            rows: HashMap::new(),
            dirs_per_seq,
            free_rows: Vec::new(),
            next_row: 0,
            pending_rows: Vec::new(),
            taken: Vec::new(),
            stage: Stage::default(),
        })
    }

    /// Assigns `dirs_per_seq` consecutive directory rows to `seq` (reusing a freed block
    /// first) and returns the first; row of directory `dir` is `first + dir`.
    pub fn add_sequence(&mut self, seq: u64) -> Result<u32> {
        if self.rows.contains_key(&seq) {
            crate::invalid!(ROWS, "sequence {seq} already has rows");
        }
        let first = match self.free_rows.pop() {
            Some(r) => r,
            None => {
                let max_rows = self.directory.dims()[0];
                if self.next_row as usize + self.dirs_per_seq > max_rows {
                    crate::invalid!(
                        ROWS,
                        "no free rows for sequence {seq}: directory {:?} holds {} sequences of {} rows, all in use",
                        self.directory.dims(),
                        max_rows / self.dirs_per_seq,
                        self.dirs_per_seq
                    );
                }
                let r = self.next_row;
                self.next_row += self.dirs_per_seq as u32;
                r
            }
        };
        self.rows.insert(seq, first);
        Ok(first)
    }

    /// Frees the rows of `seq` (cleared to `NONE` on the device by the next
    /// [`apply`](Self::apply), before any later sequence's entries). Unknown sequences
    /// are an error.
    pub fn remove_sequence(&mut self, seq: u64) -> Result<()> {
        let first = self.rows.remove(&seq).ok_or(Error::UnknownSequence(seq))?;
        self.pending_rows
            .extend((0..self.dirs_per_seq as u32).map(|d| first + d));
        self.free_rows.push(first);
        Ok(())
    }

    /// Brings the device tables in step with `tables` by writing only what changed
    /// since the previous call ([`PageTables::take_changes`]; the first call turns the
    /// log on with [`PageTables::track_changes`], which logs the current contents).
    ///
    /// Directory entries of sequences without rows here are skipped when the sequence is
    /// gone from `tables` (removed), and an error when it is still there (call
    /// [`add_sequence`](Self::add_sequence) first). A leaf id past `leaves`' rows or a
    /// directory longer than `directory`'s columns is an error naming the capacity, and
    /// nothing is written. When an upload or a scatter fails on the device, the changes
    /// (and the pending row clears) stay logged too: on any error the next call writes
    /// them all again.
    ///
    /// Whole rows emptied (freed directory rows, leaves of removed sequences) are listed
    /// by row and set to `NONE` by one fill kernel per table; the other writes of both
    /// tables are (flat index, value) pairs applied after the fills by a scatter kernel
    /// per table on the tables' stream. Pairs and row lists go to the device in one copy
    /// from pinned staging ([`StagedUpload`]; the host waits only when it runs more
    /// applies ahead of the device than the staging ring holds).
    pub fn apply(&mut self, tables: &mut PageTables) -> Result<()> {
        if tables.dirs_per_seq() != self.dirs_per_seq {
            crate::invalid!(
                APPLY,
                "tables have {} directories per sequence, these device tables {}",
                tables.dirs_per_seq(),
                self.dirs_per_seq
            );
        }
        let span = crate::host_timing::span("tables.changes");
        tables.track_changes();
        let changes = tables.take_changes();
        drop(span);
        let span = crate::host_timing::span("tables.writes");
        let mut taken = std::mem::take(&mut self.taken);
        let writes = self.writes(tables, &changes, &mut taken);
        self.taken = taken;
        drop(span);
        let _span = crate::host_timing::span("tables.scatter");
        let applied = writes.and_then(|w| {
            // One copy: both tables' (index, value) pairs, then the directory rows and the
            // leaves to empty; the fills run before the scatters.
            let (nd, nl) = (w.dir.len(), w.leaves.len());
            let (nr, ne) = (self.pending_rows.len(), w.emptied_leaves.len());
            if nd + nl + nr + ne == 0 {
                return Ok(());
            }
            let mut words: Vec<u32> = w.dir.iter().chain(&w.leaves).flat_map(|&(i, v)| [i, v]).collect();
            words.extend_from_slice(&self.pending_rows);
            words.extend_from_slice(&w.emptied_leaves);
            let span = crate::host_timing::span("tables.upload");
            let buf = self.stage.write(&words, self.directory.device())?;
            drop(span);
            let pairs = |at: usize, n: usize| -> Result<Tensor> { Ok(buf.narrow(0, 2 * at, 2 * n)?.reshape((n, 2))?) };
            let list = |at: usize, n: usize| buf.narrow(0, at, n);
            let lists = 2 * (nd + nl);
            fill_rows(&self.directory, &list(lists, nr)?, NONE)?;
            fill_rows(&self.leaves, &list(lists + nr, ne)?, NONE)?;
            scatter(&self.directory, &pairs(0, nd)?)?;
            scatter(&self.leaves, &pairs(nd, nl)?)
        });
        match applied {
            Ok(()) => {
                self.pending_rows.clear();
                Ok(())
            }
            Err(e) => {
                // Every write is an absolute value: replaying the whole log later is right
                // even when one of the two scatters already ran.
                tables.restore_changes(changes);
                Err(e)
            }
        }
    }

    /// The writes of `changes` that land after the fills (pending directory rows and
    /// emptied leaves), reduced to the last write per position before checking capacity
    /// (so that an entry written and cleared again between two applies needs no room).
    /// Clearing a position past the capacity is a no-op (lookups there give `NONE`
    /// anyway).
    fn writes(&self, tables: &PageTables, changes: &super::TableChanges, taken: &mut Vec<u64>) -> Result<Writes> {
        let cols = self.directory.dims()[1];
        let arena = self.leaves.dims()[0];
        // ((row, leaf index), leaf id, seq, dir) in order.
        let mut dir_final: Vec<((usize, usize), u32, u64, u32)> = Vec::new();
        for c in &changes.dirs {
            let Some(&first) = self.rows.get(&c.seq) else {
                if tables.contains(c.seq) {
                    crate::invalid!(
                        APPLY,
                        "sequence {} has pages but no directory rows (call add_sequence first)",
                        c.seq
                    );
                }
                continue;
            };
            let row = first as usize + c.dir as usize;
            dir_final.push(((row, c.leaf_index as usize), c.leaf, c.seq, c.dir));
        }
        let mut out = Writes::default();
        for ((row, li), leaf, seq, dir) in last_by_key(dir_final, |x| x.0) {
            if leaf == NONE && li >= cols {
                continue;
            }
            if li >= cols {
                crate::invalid!(
                    APPLY,
                    "sequence {seq} directory {dir} needs leaf {li} but directory {:?} has {cols} leaves per row \
                     (max {} pages)",
                    self.directory.dims(),
                    cols * LEAF_PAGES
                );
            }
            if leaf != NONE && leaf as usize >= arena {
                crate::invalid!(
                    APPLY,
                    "leaf id {leaf} (sequence {seq} directory {dir}) past the device leaf arena {:?}",
                    self.leaves.dims()
                );
            }
            out.dir.push(((row * cols + li) as u32, leaf));
        }
        // Newest first: an entry keeps its last write; writes older than the last time
        // their leaf was emptied are dropped (the fill runs before the scatter).
        let mut emptied = HashSet::new();
        // Entries past the arena (only clears of them are allowed) are rare: a set.
        let mut outside = HashSet::new();
        taken.resize((arena * LEAF_PAGES).div_ceil(64), 0);
        out.leaves.reserve(changes.leaves.len());
        let mut failed = None;
        for c in changes.leaves.iter().rev() {
            let leaf = c.leaf as usize;
            if c.offset == LeafChange::WHOLE_LEAF {
                if emptied.insert(leaf) && leaf < arena {
                    out.emptied_leaves.push(c.leaf);
                }
                continue;
            }
            if !emptied.is_empty() && emptied.contains(&leaf) {
                continue;
            }
            let offset = c.offset as usize;
            if leaf >= arena || offset >= LEAF_PAGES {
                let flat = (c.leaf as u64) * LEAF_PAGES as u64 + c.offset as u64;
                if !outside.insert(flat) || (c.slot == NONE && leaf >= arena) {
                    continue;
                }
                failed = Some((leaf, offset));
                break;
            }
            let flat = leaf * LEAF_PAGES + offset;
            let (word, bit) = (flat / 64, 1u64 << (flat % 64));
            if taken[word] & bit != 0 {
                continue;
            }
            taken[word] |= bit;
            out.leaves.push((flat as u32, c.slot));
        }
        for &(flat, _) in &out.leaves {
            taken[flat as usize / 64] = 0;
        }
        if let Some((leaf, offset)) = failed {
            crate::invalid!(
                APPLY,
                "leaf entry ({leaf}, {offset}) past the device leaf arena {:?}",
                self.leaves.dims()
            );
        }
        out.leaves.reverse();
        Ok(out)
    }

    /// Directory rows `[rows, max_leaves]` and leaf arena rows of these tables.
    pub fn capacity(&self) -> (usize, usize) {
        (self.directory.dims()[0], self.leaves.dims()[0])
    }

    /// Leaf ids per directory row of an upload of `seqs` (from [`PageTables::sequences`]):
    /// the longest directory, at least 1.
    fn upload_width(seqs: &[(u64, &[Vec<u32>], usize)]) -> usize {
        seqs.iter()
            .flat_map(|(_, dirs, _)| dirs.iter().map(Vec::len))
            .max()
            .unwrap_or(0)
            .max(1)
    }

    /// Copies `tables` to `device`.
    pub fn upload(tables: &PageTables, device: &Device) -> Result<Self> {
        let seqs = tables.sequences();
        let dps = tables.dirs_per_seq();
        let max_leaves = Self::upload_width(&seqs);
        let mut dir = vec![NONE; (seqs.len() * dps).max(1) * max_leaves];
        let mut rows = HashMap::new();
        for (i, (seq, dirs, _)) in seqs.iter().enumerate() {
            rows.insert(*seq, (i * dps) as u32);
            for (d, leaves) in dirs.iter().enumerate() {
                let base = (i * dps + d) * max_leaves;
                dir[base..base + leaves.len()].copy_from_slice(leaves);
            }
        }
        let arena = tables.leaf_arena();
        let flat: Vec<u32> = if arena.is_empty() {
            vec![NONE; LEAF_PAGES]
        } else {
            arena.iter().flatten().copied().collect()
        };
        let n_leaves = flat.len() / LEAF_PAGES;
        Ok(Self {
            directory: Tensor::from_vec(dir, ((seqs.len() * dps).max(1), max_leaves), device)?,
            leaves: Tensor::from_vec(flat, (n_leaves, LEAF_PAGES), device)?,
            next_row: (seqs.len() * dps) as u32,
            rows,
            dirs_per_seq: dps,
            free_rows: Vec::new(),
            pending_rows: Vec::new(),
            taken: Vec::new(),
            stage: Stage::default(),
        })
    }

    /// Directory row of (`seq`, `dir` = layer·Hkv + head), if `seq` was uploaded.
    pub fn row(&self, seq: u64, dir: usize) -> Option<u32> {
        (dir < self.dirs_per_seq).then_some(())?;
        self.rows.get(&seq).map(|r| r + dir as u32)
    }

    /// Device bytes of the directory and the leaf arena.
    pub fn bytes(&self) -> usize {
        (self.directory.elem_count() + self.leaves.elem_count()) * std::mem::size_of::<u32>()
    }

    /// Device bytes an upload of `tables` takes (without allocating it).
    pub fn bytes_for(tables: &PageTables) -> usize {
        let seqs = tables.sequences();
        let dir = (seqs.len() * tables.dirs_per_seq()).max(1) * Self::upload_width(&seqs);
        let leaves = tables.leaf_arena().len().max(1) * LEAF_PAGES;
        (dir + leaves) * std::mem::size_of::<u32>()
    }

    /// Slots of `queries` `[n, 2]` u32 (directory row, logical page): see [`page_slots`].
    pub fn lookup(&self, queries: &Tensor) -> Result<Tensor> {
        page_slots(&self.directory, &self.leaves, queries)
    }

    /// Slots of the grid `[G, K]` of (row `rows[g]`, page `pages[g, k]` or `k`): see
    /// [`page_slots_grid`](crate::ops::page_slots_grid).
    pub fn lookup_grid(&self, rows: &Tensor, pages: Option<&Tensor>, k: usize) -> Result<Tensor> {
        crate::ops::page_slots_grid(&self.directory, &self.leaves, rows, pages, k)
    }

    /// [`lookup_grid`](Self::lookup_grid) with each row's pages cut at a token limit:
    /// see [`page_slots_grid_limited`](crate::ops::page_slots_grid_limited).
    pub fn lookup_grid_limited(
        &self,
        rows: &Tensor,
        pages: Option<&Tensor>,
        k: usize,
        limit: crate::ops::GridLimit<'_>,
    ) -> Result<Tensor> {
        crate::ops::page_slots_grid_limited(&self.directory, &self.leaves, rows, pages, k, Some(limit))
    }
}

/// What one [`DeviceTables::apply`] writes besides the pending directory rows.
#[derive(Debug, Default)]
struct Writes {
    /// Leaves set wholly to `NONE` first.
    emptied_leaves: Vec<u32>,
    /// (flat index, value) directory writes, then leaf writes, scattered after the fills.
    dir: Vec<(u32, u32)>,
    leaves: Vec<(u32, u32)>,
}

/// `items` with only the last item of each key kept (so that the scatter kernel's threads
/// never race on one index), in their original order.
fn last_by_key<T, K: std::hash::Hash + Eq>(items: Vec<T>, key: impl Fn(&T) -> K) -> Vec<T> {
    let mut seen = HashSet::with_capacity(items.len());
    let mut out: Vec<T> = items.into_iter().rev().filter(|x| seen.insert(key(x))).collect();
    out.reverse();
    out
}
