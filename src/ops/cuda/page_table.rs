//! Launch glue for `kernels/page_table.cu`: the device page-table lookup behind
//! [`page_slots`](crate::meta::page_slots), and the scatter behind
//! [`DeviceTables::apply`](crate::meta::DeviceTables::apply) and its row fill.

use super::{alloc, cfg, func, launch, ptr, ptr_mut, PAGE_TABLE};
use candle_core::{CudaStorage, Layout, Result, Shape};

const OP: &str = "page_slots";

/// One thread per query: two dependent loads (directory, leaf).
pub(crate) fn page_slots(
    d: &CudaStorage,
    dl: &Layout,
    l: &CudaStorage,
    ll: &Layout,
    q: &CudaStorage,
    ql: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (rows, max_leaves) = dl.shape().dims2()?;
    let n_leaves = ll.dims()[0];
    let n = ql.dims()[0];
    let dev = super::device(q).clone();
    let (out, op) = alloc::<u32>(&dev, n)?;
    if n > 0 {
        let f = func(&dev, &PAGE_TABLE, "page_slots")?;
        let blocks = n.div_ceil(256).min(65535) as u32;
        launch!(
            f,
            cfg(blocks, 256, 0),
            ptr(OP, d, dl)?,
            ptr(OP, l, ll)?,
            ptr(OP, q, ql)?,
            op,
            n as i32,
            rows as u32,
            max_leaves as u32,
            n_leaves as u32
        )?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from_dims(&[n])))
}

/// One thread per (row, column) of the grid: [`crate::ops::page_slots_grid`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn page_slots_grid(
    d: &CudaStorage,
    dl: &Layout,
    l: &CudaStorage,
    ll: &Layout,
    r: &CudaStorage,
    rl: &Layout,
    pages: Option<&candle_core::Tensor>,
    k: usize,
    limit: Option<&(candle_core::Tensor, usize, usize)>,
) -> Result<(CudaStorage, Shape)> {
    const G: &str = "page_slots_grid";
    let (rows, max_leaves) = dl.shape().dims2()?;
    let n_leaves = ll.dims()[0];
    let n = rl.dims()[0] * k;
    if n > i32::MAX as usize {
        candle_core::bail!("{G}: {n} queries exceed the launch limit");
    }
    let dev = super::device(r).clone();
    let (out, op) = alloc::<u32>(&dev, n)?;
    if n > 0 {
        let pp = match pages {
            Some(p) => super::field_ptr(G, "pages", p)?,
            None => 0u64,
        };
        let (lp, group, page_size) = match limit {
            Some((t, g, p)) => (super::field_ptr(G, "limit", t)?, *g as i32, *p as u32),
            None => (0u64, 1, 1),
        };
        let f = func(&dev, &PAGE_TABLE, "page_slots_grid")?;
        let blocks = n.div_ceil(256).min(65535) as u32;
        launch!(
            f,
            cfg(blocks, 256, 0),
            ptr(G, d, dl)?,
            ptr(G, l, ll)?,
            ptr(G, r, rl)?,
            pp,
            op,
            n as i32,
            k as i32,
            rows as u32,
            max_leaves as u32,
            n_leaves as u32,
            lp,
            group,
            page_size
        )?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from_dims(&[n])))
}

/// `dst[writes[i, 0]] = writes[i, 1]` (u32, distinct indices; out-of-range skipped).
pub(crate) fn scatter_u32(dst: &mut CudaStorage, dl: &Layout, w: &CudaStorage, wl: &Layout) -> Result<()> {
    let n = wl.dims()[0];
    if n == 0 {
        return Ok(());
    }
    if n > i32::MAX as usize {
        candle_core::bail!("scatter_u32: {n} writes exceed the launch limit");
    }
    let len = dl.shape().elem_count();
    let dev = super::device(w).clone();
    let f = func(&dev, &PAGE_TABLE, "scatter_u32")?;
    let blocks = n.div_ceil(256).min(65535) as u32;
    launch!(
        f,
        cfg(blocks, 256, 0),
        ptr_mut("scatter_u32", dst, dl)?,
        ptr("scatter_u32", w, wl)?,
        n as i32,
        len as u32
    )
}

/// `dst[rows[i], :] = value` for every listed row (u32 `[R, C]`; rows `>= R` skipped).
pub(crate) fn fill_rows_u32(
    dst: &mut CudaStorage,
    dl: &Layout,
    r: &CudaStorage,
    rl: &Layout,
    value: u32,
) -> Result<()> {
    const F: &str = "fill_rows_u32";
    let n = rl.dims()[0];
    let (rows, cols) = dl.shape().dims2()?;
    let total = n * cols;
    if total == 0 {
        return Ok(());
    }
    if total > i32::MAX as usize {
        candle_core::bail!("{F}: {n} rows of {cols} exceed the launch limit");
    }
    let dev = super::device(r).clone();
    let f = func(&dev, &PAGE_TABLE, F)?;
    let blocks = total.div_ceil(256).min(65535) as u32;
    launch!(
        f,
        cfg(blocks, 256, 0),
        ptr_mut(F, dst, dl)?,
        ptr(F, r, rl)?,
        n as i32,
        cols as i32,
        rows as u32,
        value
    )
}

/// One thread per (layer, row, KV head): [`crate::ops::decode_plan::expand_decode_plan`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn padded_plan(
    w: &mut CudaStorage,
    wl: &Layout,
    d: &CudaStorage,
    dl: &Layout,
    l: &CudaStorage,
    ll: &Layout,
    lay: &crate::ops::decode_plan::PlanWords,
    page_size: u32,
) -> Result<()> {
    const F: &str = "padded_plan";
    let (rows, max_leaves) = dl.shape().dims2()?;
    let n_leaves = ll.dims()[0];
    let plane = lay.plane();
    let dev = super::device(d).clone();
    let f = func(&dev, &PAGE_TABLE, F)?;
    let blocks = plane.div_ceil(256).min(65535) as u32;
    launch!(
        f,
        cfg(blocks, 256, 0),
        ptr_mut(F, w, wl)?,
        ptr(F, d, dl)?,
        ptr(F, l, ll)?,
        plane as i32,
        lay.b as i32,
        lay.hkv as i32,
        page_size,
        lay.queries as i32,
        lay.row0 as i32,
        lay.dst as i32,
        lay.dst_slots as i32,
        lay.dst_rows as i32,
        lay.table_rows as i32,
        rows as u32,
        max_leaves as u32,
        n_leaves as u32
    )
}

/// The most blocks [`count_listed`] launches (two waves of 132 SMs' worth).
const COUNT_BLOCKS: usize = 264;

/// `counts[index] += ` the listed entries of `pairs` (see
/// [`count_listed_into`](crate::ops::count_listed_into)): a block per 256 pairs, at most
/// [`COUNT_BLOCKS`] (then each thread takes several), each adding its partial count
/// atomically.
pub(crate) fn count_listed(
    counts: &mut CudaStorage,
    cl: &Layout,
    pairs: &candle_core::Tensor,
    index: usize,
) -> Result<()> {
    const OP: &str = "count_listed_into";
    let n = pairs.elem_count() / 2;
    let pp = super::field_ptr(OP, "pairs", pairs)?;
    let dev = super::device(counts).clone();
    let cp = ptr_mut(OP, counts, cl)?;
    let f = func(&dev, &PAGE_TABLE, "count_listed")?;
    let blocks = n.div_ceil(256).clamp(1, COUNT_BLOCKS);
    launch!(f, cfg(blocks as u32, 256, 0), cp, pp, n as u64, index as u32)
}
