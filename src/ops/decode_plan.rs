//! The device side of a padded decode step's plan: [`PlanWords`], the layout of every u32
//! input of a padded step in one buffer, and [`expand_decode_plan`], which fills the
//! per-(layer, row, KV head) part of that buffer — each new token's destination slot and
//! row, and each row's device page-table row — from the few words per row the host
//! uploads (position, directory row, owner), looking the slots up in the device page
//! tables. `cpu_fwd` is the reference; `cuda_fwd` launches `padded_plan` in
//! `kernels/page_table.cu`.

use super::{LEAF_PAGES, NONE};
use crate::Result;
use candle_core::{CpuStorage, DType, InplaceOp3, Layout, Tensor};

const OP: &str = "expand_decode_plan";

/// Offsets (in u32 words) of the inputs of a padded decode step of `b` rows, `layers`
/// layers and `hkv` KV heads in one buffer. The host writes the first
/// [`host_words`](Self::host_words) every step (`queries`, `kv_limit`, `row0`, `owners`,
/// `positions`, `runs`, then `extra_len` words of the caller's at `extra`);
/// [`expand_decode_plan`] computes `dst`, `dst_slots`, `dst_rows` and `table_rows`; `none`
/// and `page_ids` are constants written once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanWords {
    /// Rows (the padded batch).
    pub b: usize,
    /// Layers.
    pub layers: usize,
    /// KV heads.
    pub hkv: usize,
    /// `[b, 2]` (row, position) of each row's query.
    pub queries: usize,
    /// `[b]` tokens each row attends (0 for padding rows).
    pub kv_limit: usize,
    /// `[b]` device page-table row of (entry, layer 0, head 0), `NONE` for padding rows.
    pub row0: usize,
    /// `[b]` owner index of each row (0 for padding rows).
    pub owners: usize,
    /// `[b]` position of each row's token (0 for padding rows; RoPE tables are built
    /// from it).
    pub positions: usize,
    /// `[b, 4]` runs table `(owner, position, n, row)` of the rows (`n` = 1, or 0 for
    /// padding rows), the form algorithms' device ops read.
    pub runs: usize,
    /// `[extra_len]` words the caller uploads with the step's own (e.g. the engine's token
    /// ids and sampling rows; see `SparseKvCache::begin_padded_decode_with`).
    pub extra: usize,
    /// Words at `extra`.
    pub extra_len: usize,
    /// `[L, b, Hkv]` host destination `slot · P + row` of each new token.
    pub dst: usize,
    /// `[L, b, Hkv]` host slot of each destination.
    pub dst_slots: usize,
    /// `[L, b, Hkv]` row of each destination within its page.
    pub dst_rows: usize,
    /// `[L, b, Hkv]` device page-table row of each (layer, row, head).
    pub table_rows: usize,
    /// `[b, Hkv]` all `NONE`.
    pub none: usize,
    /// `[pages]` the logical pages `0..pages`.
    pub page_ids: usize,
    /// Words in all.
    pub total: usize,
}

impl PlanWords {
    /// The layout for `b` rows, `layers` layers, `hkv` KV heads and `pages` logical pages.
    pub fn new(b: usize, layers: usize, hkv: usize, pages: usize) -> Self {
        Self::with_extra(b, layers, hkv, pages, 0)
    }

    /// [`new`](Self::new) with `extra_len` words of the caller's among the host words.
    pub fn with_extra(b: usize, layers: usize, hkv: usize, pages: usize, extra_len: usize) -> Self {
        let plane = layers * b * hkv;
        let dst = 10 * b + extra_len;
        let none = dst + 4 * plane;
        Self {
            b,
            layers,
            hkv,
            queries: 0,
            kv_limit: 2 * b,
            row0: 3 * b,
            owners: 4 * b,
            positions: 5 * b,
            runs: 6 * b,
            extra: 10 * b,
            extra_len,
            dst,
            dst_slots: dst + plane,
            dst_rows: dst + 2 * plane,
            table_rows: dst + 3 * plane,
            none,
            page_ids: none + b * hkv,
            total: none + b * hkv + pages,
        }
    }

    /// Words the host writes every step (they come first).
    pub fn host_words(&self) -> usize {
        self.dst
    }

    /// `L · b · Hkv`.
    pub fn plane(&self) -> usize {
        self.layers * self.b * self.hkv
    }
}

/// Fills `dst`, `dst_slots`, `dst_rows` and `table_rows` of `words` (laid out by `lay`) in
/// place from its host part: for row `r` with `row0[r] != NONE` at position `pos`, in
/// (layer `l`, head `h`), the table row is `row0[r] + l · Hkv + h`, the slot is that row's
/// logical page `pos / page_size` in `directory` `[rows, max_leaves]` / `leaves`
/// `[n_leaves, 64]` (`NONE` when it has none), the row in the page is `pos % page_size`
/// and the destination `slot · page_size + row` (`NONE` with the slot). Padding rows get
/// `NONE` destinations, slots and table rows, and row 0.
pub fn expand_decode_plan(
    words: &Tensor,
    directory: &Tensor,
    leaves: &Tensor,
    lay: &PlanWords,
    page_size: usize,
) -> Result<()> {
    let ok = words.dims() == [lay.total]
        && directory.rank() == 2
        && leaves.rank() == 2
        && leaves.dims()[1] == LEAF_PAGES
        && [words, directory, leaves].iter().all(|t| t.dtype() == DType::U32)
        && page_size > 0
        && lay.total < i32::MAX as usize;
    if !ok {
        crate::invalid!(
            OP,
            "words {:?}, directory {:?}, leaves {:?} (page size {page_size}): expected u32 [{}], [rows, L], \
             [n_leaves, {LEAF_PAGES}] and a page size >= 1",
            words.dims(),
            directory.dims(),
            leaves.dims(),
            lay.total
        );
    }
    if !words.device().same_device(directory.device()) || !words.device().same_device(leaves.device()) {
        crate::invalid!(OP, "words, directory and leaves must be on one device");
    }
    if !words.is_contiguous() || !directory.is_contiguous() || !leaves.is_contiguous() {
        crate::invalid!(OP, "words, directory and leaves must be contiguous");
    }
    if lay.plane() == 0 {
        return Ok(());
    }
    words.inplace_op3(
        directory,
        leaves,
        &ExpandPlan {
            lay: *lay,
            page_size: page_size as u32,
        },
    )?;
    Ok(())
}

struct ExpandPlan {
    lay: PlanWords,
    page_size: u32,
}

impl InplaceOp3 for ExpandPlan {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        w: &mut CpuStorage,
        wl: &Layout,
        d: &CpuStorage,
        dl: &Layout,
        l: &CpuStorage,
        ll: &Layout,
    ) -> candle_core::Result<()> {
        let (dir, leaves) = (super::util::u32_slice(OP, d, dl)?, super::util::u32_slice(OP, l, ll)?);
        let max_leaves = dl.dims()[1];
        let (CpuStorage::U32(w), Some((w0, w1))) = (w, wl.contiguous_offsets()) else {
            candle_core::bail!("{OP}: words must be contiguous u32");
        };
        let w = &mut w[w0..w1];
        let (lay, p) = (&self.lay, self.page_size);
        let lookup = |row: u32, page: u32| super::page_table::lookup_one(dir, max_leaves, leaves, row, page);
        for i in 0..lay.plane() {
            let (layer, r, h) = (i / (lay.b * lay.hkv), i / lay.hkv % lay.b, i % lay.hkv);
            let row0 = w[lay.row0 + r];
            let (slot, in_page, trow) = if row0 == NONE {
                (NONE, 0, NONE)
            } else {
                let pos = w[lay.queries + 2 * r + 1];
                let trow = row0.wrapping_add((layer * lay.hkv + h) as u32);
                (lookup(trow, pos / p), pos % p, trow)
            };
            w[lay.dst_slots + i] = slot;
            w[lay.dst_rows + i] = in_page;
            w[lay.dst + i] = if slot == NONE {
                NONE
            } else {
                slot.wrapping_mul(p).wrapping_add(in_page)
            };
            w[lay.table_rows + i] = trow;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        w: &mut candle_core::CudaStorage,
        wl: &Layout,
        d: &candle_core::CudaStorage,
        dl: &Layout,
        l: &candle_core::CudaStorage,
        ll: &Layout,
    ) -> candle_core::Result<()> {
        crate::ops::cuda::page_table::padded_plan(w, wl, d, dl, l, ll, &self.lay, self.page_size)
    }
}
