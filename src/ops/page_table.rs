//! Two-level page-table ops on a device: [`page_slots`] translates (directory row,
//! logical page) queries into host slots through a directory matrix and a leaf arena (the
//! layout of [`DeviceTables`](crate::meta::DeviceTables)), and `scatter` and `fill_rows`
//! update such a table in place. `cpu_fwd` is the reference; `cuda_fwd` launches
//! `kernels/page_table.cu`.

use super::{LEAF_PAGES, NONE};
use crate::Result;
use candle_core::{CpuStorage, CustomOp3, DType, InplaceOp2, Layout, Shape, Tensor};

const OP: &str = "page_slots";

/// `table.flatten()[i] = v` for every row `(i, v)` of `pairs` (u32 `[n, 2]`, contiguous,
/// on the table's device; distinct indices), in place on the table's device. Indices past
/// the table are skipped.
pub(crate) fn scatter(table: &Tensor, pairs: &Tensor) -> Result<()> {
    let ok = pairs.rank() == 2
        && pairs.dims()[1] == 2
        && pairs.dtype() == DType::U32
        && table.dtype() == DType::U32
        && pairs.is_contiguous()
        && pairs.device().same_device(table.device());
    if !ok {
        crate::invalid!(
            "scatter",
            "pairs {:?} {:?} on {:?} into table {:?} {:?}: expected contiguous u32 [n, 2] on the table's device \
             and a u32 table",
            pairs.dims(),
            pairs.dtype(),
            pairs.device().location(),
            table.dims(),
            table.dtype()
        );
    }
    if pairs.dims()[0] == 0 {
        return Ok(());
    }
    crate::fault::device_call("DeviceTables::apply")?;
    table.inplace_op2(pairs, &ScatterU32)?;
    Ok(())
}

struct ScatterU32;

impl InplaceOp2 for ScatterU32 {
    fn name(&self) -> &'static str {
        "scatter_u32"
    }

    fn cpu_fwd(&self, d: &mut CpuStorage, dl: &Layout, w: &CpuStorage, wl: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::U32(dst), CpuStorage::U32(w)) = (d, w) else {
            candle_core::bail!("scatter_u32: operands must be u32");
        };
        let (Some((d0, d1)), Some((w0, w1))) = (dl.contiguous_offsets(), wl.contiguous_offsets()) else {
            candle_core::bail!("scatter_u32: operands must be contiguous");
        };
        let dst = &mut dst[d0..d1];
        for p in w[w0..w1].chunks_exact(2) {
            if let Some(x) = dst.get_mut(p[0] as usize) {
                *x = p[1];
            }
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        d: &mut candle_core::CudaStorage,
        dl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<()> {
        crate::ops::cuda::page_table::scatter_u32(d, dl, w, wl)
    }
}

/// Sets every entry of rows `rows` (u32 `[n]`, contiguous, on the table's device) of
/// `table` `[R, C]` u32 to `value`, in place on the table's device (rows `>= R` are
/// skipped). One kernel: this is how whole directory rows and leaves are emptied without
/// a write per entry.
pub(crate) fn fill_rows(table: &Tensor, rows: &Tensor, value: u32) -> Result<()> {
    let ok = table.rank() == 2
        && table.dtype() == DType::U32
        && rows.rank() == 1
        && rows.dtype() == DType::U32
        && rows.is_contiguous()
        && rows.device().same_device(table.device());
    if !ok {
        crate::invalid!(
            "fill_rows",
            "rows {:?} {:?} into table {:?} {:?}: expected contiguous u32 [n] on the table's device and a u32 \
             [R, C] table",
            rows.dims(),
            rows.dtype(),
            table.dims(),
            table.dtype()
        );
    }
    if rows.dims()[0] == 0 {
        return Ok(());
    }
    crate::fault::device_call("DeviceTables::apply")?;
    table.inplace_op2(rows, &FillRowsU32 { value })?;
    Ok(())
}

struct FillRowsU32 {
    value: u32,
}

impl InplaceOp2 for FillRowsU32 {
    fn name(&self) -> &'static str {
        "fill_rows_u32"
    }

    fn cpu_fwd(&self, d: &mut CpuStorage, dl: &Layout, r: &CpuStorage, rl: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::U32(dst), CpuStorage::U32(r)) = (d, r) else {
            candle_core::bail!("fill_rows_u32: operands must be u32");
        };
        let (Some((d0, d1)), Some((r0, r1))) = (dl.contiguous_offsets(), rl.contiguous_offsets()) else {
            candle_core::bail!("fill_rows_u32: operands must be contiguous");
        };
        let cols = dl.dims()[1];
        let dst = &mut dst[d0..d1];
        for &row in &r[r0..r1] {
            if let Some(x) = dst.get_mut(row as usize * cols..(row as usize + 1) * cols) {
                x.fill(self.value);
            }
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        d: &mut candle_core::CudaStorage,
        dl: &Layout,
        r: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> candle_core::Result<()> {
        crate::ops::cuda::page_table::fill_rows_u32(d, dl, r, rl, self.value)
    }
}

struct PageSlots;

/// The slot of logical `page` in directory row `row` of the tables `dir`
/// `[rows, max_leaves]` and `leaves` `[n, LEAF_PAGES]`; `NONE` where either is `NONE`, out
/// of range, or not mapped (the CPU reference of the kernels' `slot_of`).
pub(super) fn lookup_one(dir: &[u32], max_leaves: usize, leaves: &[u32], row: u32, page: u32) -> u32 {
    let li = page as usize / LEAF_PAGES;
    if row == NONE || page == NONE || li >= max_leaves || row as usize >= dir.len() / max_leaves {
        return NONE;
    }
    let leaf = dir[row as usize * max_leaves + li];
    if leaf == NONE || (leaf as usize) >= leaves.len() / LEAF_PAGES {
        return NONE;
    }
    leaves[leaf as usize * LEAF_PAGES + page as usize % LEAF_PAGES]
}

fn lookup_cpu(dir: &[u32], max_leaves: usize, leaves: &[u32], q: &[u32]) -> Vec<u32> {
    q.chunks_exact(2)
        .map(|rq| lookup_one(dir, max_leaves, leaves, rq[0], rq[1]))
        .collect()
}

impl CustomOp3 for PageSlots {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        d: &CpuStorage,
        dl: &Layout,
        l: &CpuStorage,
        ll: &Layout,
        q: &CpuStorage,
        ql: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let slice = |s: &CpuStorage, lay: &Layout| -> candle_core::Result<Vec<u32>> {
            match (s, lay.contiguous_offsets()) {
                (CpuStorage::U32(v), Some((a, b))) => Ok(v[a..b].to_vec()),
                _ => candle_core::bail!("{OP}: operands must be contiguous u32"),
            }
        };
        let max_leaves = dl.dims()[1];
        let out = lookup_cpu(&slice(d, dl)?, max_leaves, &slice(l, ll)?, &slice(q, ql)?);
        let n = out.len();
        Ok((CpuStorage::U32(out), Shape::from_dims(&[n])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        d: &candle_core::CudaStorage,
        dl: &Layout,
        l: &candle_core::CudaStorage,
        ll: &Layout,
        q: &candle_core::CudaStorage,
        ql: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::page_table::page_slots(d, dl, l, ll, q, ql)
    }
}

/// Translates `queries` `[n, 2]` u32 (directory row, logical page) to host slots `[n]`
/// u32 through `directory` `[rows, max_leaves]` and `leaves` `[leaves, 64]` (as built by
/// [`DeviceTables::upload`](crate::meta::DeviceTables::upload)), on their device. Out-of-range rows, pages past a
/// directory's leaves and `NONE` queries give `NONE`.
pub fn page_slots(directory: &Tensor, leaves: &Tensor, queries: &Tensor) -> Result<Tensor> {
    let ok = directory.rank() == 2
        && leaves.dims().get(1) == Some(&LEAF_PAGES)
        && leaves.rank() == 2
        && queries.rank() == 2
        && queries.dims()[1] == 2
        && [directory, leaves, queries].iter().all(|t| t.dtype() == DType::U32);
    if !ok {
        crate::invalid!(
            OP,
            "directory {:?} {:?}, leaves {:?} {:?}, queries {:?} {:?}: expected u32 [rows, L], [n_leaves, {LEAF_PAGES}], [n, 2]",
            directory.dims(),
            directory.dtype(),
            leaves.dims(),
            leaves.dtype(),
            queries.dims(),
            queries.dtype()
        );
    }
    if !directory.device().same_device(leaves.device()) || !directory.device().same_device(queries.device()) {
        crate::invalid!(OP, "directory, leaves and queries must be on one device");
    }
    if queries.dims()[0] == 0 {
        return Ok(Tensor::zeros(0, DType::U32, queries.device())?);
    }
    let (d, l, q) = (directory.contiguous()?, leaves.contiguous()?, queries.contiguous()?);
    Ok(d.apply_op3_no_bwd(&l, &q, &PageSlots)?)
}

/// Host slots of a grid of queries `[G, K]`: row `rows[g]` of the directory with logical
/// page `pages[g, k]`, or page `k` when `pages` is `None` (every page `0..K` of each row),
/// through `directory` `[rows, max_leaves]` and `leaves` `[leaves, 64]` as in
/// [`page_slots`]. `rows` is `[G]` u32, `pages` `[G, K]` u32. One kernel on CUDA (no
/// query tensor is built). `NONE` rows or pages, and pages past a row's leaves, give `NONE`.
pub fn page_slots_grid(
    directory: &Tensor,
    leaves: &Tensor,
    rows: &Tensor,
    pages: Option<&Tensor>,
    k: usize,
) -> Result<Tensor> {
    page_slots_grid_limited(directory, leaves, rows, pages, k, None)
}

/// A grid row's page limit for [`page_slots_grid_limited`]: `tokens` `[G / group]` u32
/// token counts, shared by `group` consecutive grid rows (e.g. the KV heads of one
/// sequence), in pages of `page_size` tokens.
#[derive(Debug, Clone, Copy)]
pub struct GridLimit<'a> {
    /// `[G / group]` u32 tokens.
    pub tokens: &'a Tensor,
    /// Grid rows per entry of `tokens` (`>= 1`).
    pub group: usize,
    /// Tokens per page (`>= 1`).
    pub page_size: usize,
}

/// [`page_slots_grid`], where grid row `g` also gives `NONE` for every page at or past
/// `⌈limit.tokens[g / group] / page_size⌉` (a sequence's pages held past its length, as
/// [`SparseKvCache::reserve`](crate::SparseKvCache::reserve) leaves them). The limit is
/// read on the device (a captured graph reads each replay's).
pub fn page_slots_grid_limited(
    directory: &Tensor,
    leaves: &Tensor,
    rows: &Tensor,
    pages: Option<&Tensor>,
    k: usize,
    limit: Option<GridLimit<'_>>,
) -> Result<Tensor> {
    const GOP: &str = "page_slots_grid";
    if let Some(l) = limit {
        let g = rows.dims1().unwrap_or(0);
        let ok = l.group >= 1
            && l.page_size >= 1
            && l.tokens.dtype() == DType::U32
            && l.tokens.dims1().is_ok_and(|n| n * l.group == g)
            && l.tokens.device().same_device(directory.device());
        if !ok {
            crate::invalid!(
                GOP,
                "limit tokens {:?} {:?} (group {}, page size {}) for rows {:?}: expected u32 [G / group] on the \
                 tables' device, group and page size >= 1",
                l.tokens.dims(),
                l.tokens.dtype(),
                l.group,
                l.page_size,
                rows.dims()
            );
        }
    }
    let g = rows.dims1().unwrap_or(usize::MAX);
    let tables_ok = directory.rank() == 2
        && leaves.rank() == 2
        && leaves.dims()[1] == LEAF_PAGES
        && [directory, leaves, rows].iter().all(|t| t.dtype() == DType::U32);
    let pages_ok = pages.is_none_or(|p| p.dims() == [g, k] && p.dtype() == DType::U32);
    if !tables_ok || g == usize::MAX || !pages_ok {
        crate::invalid!(
            GOP,
            "directory {:?}, leaves {:?}, rows {:?} {:?}, pages {:?}: expected u32 [rows, L], [n_leaves, \
             {LEAF_PAGES}], [G], [G, K={k}]",
            directory.dims(),
            leaves.dims(),
            rows.dims(),
            rows.dtype(),
            pages.map(|p| p.dims().to_vec())
        );
    }
    let dev = directory.device();
    if ![leaves, rows]
        .into_iter()
        .chain(pages)
        .all(|t| t.device().same_device(dev))
    {
        crate::invalid!(GOP, "directory, leaves, rows and pages must be on one device");
    }
    if g == 0 || k == 0 {
        return Ok(Tensor::zeros((g, k), DType::U32, dev)?);
    }
    let op = PageSlotsGrid {
        pages: pages.map(Tensor::contiguous).transpose()?,
        k,
        limit: match limit {
            Some(l) => Some((l.tokens.contiguous()?, l.group, l.page_size)),
            None => None,
        },
    };
    let (d, l, r) = (directory.contiguous()?, leaves.contiguous()?, rows.contiguous()?);
    Ok(d.apply_op3_no_bwd(&l, &r, &op)?.reshape((g, k))?)
}

struct PageSlotsGrid {
    /// `[G, K]` u32 logical pages (`None`: page k in column k).
    pages: Option<Tensor>,
    k: usize,
    /// (`[G / group]` u32 tokens, group, page size): see [`GridLimit`].
    limit: Option<(Tensor, usize, usize)>,
}

impl CustomOp3 for PageSlotsGrid {
    fn name(&self) -> &'static str {
        "page_slots_grid"
    }

    fn cpu_fwd(
        &self,
        d: &CpuStorage,
        dl: &Layout,
        l: &CpuStorage,
        ll: &Layout,
        r: &CpuStorage,
        rl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let slice = |s: &CpuStorage, lay: &Layout| -> candle_core::Result<Vec<u32>> {
            match (s, lay.contiguous_offsets()) {
                (CpuStorage::U32(v), Some((a, b))) => Ok(v[a..b].to_vec()),
                _ => candle_core::bail!("page_slots_grid: operands must be contiguous u32"),
            }
        };
        let rows = slice(r, rl)?;
        let pages = match &self.pages {
            Some(p) => p.flatten_all()?.to_vec1::<u32>()?,
            None => (0..rows.len() * self.k).map(|i| (i % self.k) as u32).collect(),
        };
        let q: Vec<u32> = pages
            .iter()
            .enumerate()
            .flat_map(|(i, &p)| [rows[i / self.k], p])
            .collect();
        let mut out = lookup_cpu(&slice(d, dl)?, dl.dims()[1], &slice(l, ll)?, &q);
        if let Some((tokens, group, p)) = &self.limit {
            let tokens = tokens.to_vec1::<u32>()?;
            for (i, o) in out.iter_mut().enumerate() {
                if pages[i] as u64 * *p as u64 >= tokens[i / self.k / group] as u64 {
                    *o = NONE;
                }
            }
        }
        let n = out.len();
        Ok((CpuStorage::U32(out), Shape::from_dims(&[n])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        d: &candle_core::CudaStorage,
        dl: &Layout,
        l: &candle_core::CudaStorage,
        ll: &Layout,
        r: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::page_table::page_slots_grid(
            d,
            dl,
            l,
            ll,
            r,
            rl,
            self.pages.as_ref(),
            self.k,
            self.limit.as_ref(),
        )
    }
}
