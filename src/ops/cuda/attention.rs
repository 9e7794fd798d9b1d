//! Launch glue for `kernels/attention.cu`: sparse paged decode attention on CUDA (used by
//! [`sparse_paged_attention`](crate::ops::sparse_paged_attention)).
//!
//! bf16/f16 with head_dim 64 or 128 and up to 16 query heads per KV head take the
//! tensor-core kernel, split along the page list so that the launch fills the GPU once
//! (flash-decoding), then `spa_merge` combines the splits. Everything else (f32, other
//! head dims, larger GQA groups) takes the generic kernel.

use super::{alloc, func, launch, ptr, sm_count, suffix, ATTENTION};
use crate::ops::PageList;
use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, DType, Layout, Result, Shape};

const OP: &str = "sparse_paged_attention";
const THREADS: u32 = 128;
/// Fewest list entries one split (4 warps) takes.
const MIN_PER_SPLIT: usize = 8;

/// Flat `[T·Hq·D + T·Hq]` f32: the output `[T, Hq, D]`, then the lse `[T, Hq]` (both
/// halves contiguous, so the public op takes them as views without a copy).
pub(crate) fn sparse_paged_attention(
    q: &CudaStorage,
    ql: &Layout,
    pool: &CudaStorage,
    pl: &Layout,
    list: &PageList,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let (slots, _, p, hd) = pl.shape().dims4()?;
    let pool = PoolRef {
        ptr: ptr(OP, pool, pl)?,
        slots,
        page_size: p,
        head_dim: hd,
    };
    sparse_paged_attention_at(q, ql, pool, list, scale)
}

/// A page pool `[slots, 2, page_size, D]` (the queries' dtype and head dim) at a device
/// address: a candle tensor's buffer, or mapped pinned host memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolRef {
    pub ptr: u64,
    pub slots: usize,
    pub page_size: usize,
    pub head_dim: usize,
}

/// [`sparse_paged_attention`] over the pool at `pool` (same kernels, same output layout).
pub(crate) fn sparse_paged_attention_at(
    q: &CudaStorage,
    ql: &Layout,
    pool: PoolRef,
    list: &PageList,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let (t, hq, d) = ql.shape().dims3()?;
    let PoolRef {
        ptr: pp,
        slots,
        page_size: p,
        head_dim,
    } = pool;
    if head_dim != d {
        candle_core::bail!(
            "{OP}: pool head_dim {head_dim} differs from the queries' {d} (q {:?})",
            ql.dims()
        );
    }
    let (s, hkv, n, _) = list.pages.dims4()?;
    let dev = super::device(q).clone();
    let shape = Shape::from_dims(&[t * hq * (d + 1)]);
    let lse_off = (t * hq * d) as u64;
    let (out, outp) = alloc::<f32>(&dev, t * hq * (d + 1))?;
    if t == 0 {
        return Ok((CudaStorage::wrap_cuda_slice(out, dev), shape));
    }
    let qp = ptr(OP, q, ql)?;
    let pages = super::field_ptr(OP, "pages", &list.pages)?;
    let queries = super::field_ptr(OP, "queries", &list.queries)?;
    let kv_limit = super::field_ptr(OP, "kv_limit", &list.kv_limit)?;
    let g = hq / hkv;
    let dt = q.dtype();
    let fast =
        matches!(dt, DType::BF16 | DType::F16) && (d == 64 || d == 128) && g <= 16 && qp % 16 == 0 && pp % 16 == 0;
    if !fast || n == 0 {
        if d > 512 {
            candle_core::bail!("{OP}: head_dim {d} > 512 is not supported on CUDA");
        }
        let name = format!("spa_generic_{}", suffix(OP, dt)?);
        let f = func(&dev, &ATTENTION, &name)?;
        launch!(
            f,
            super::cfg((t * hq) as u32, THREADS, 0),
            qp,
            pp,
            pages,
            queries,
            kv_limit,
            outp,
            hq as i32,
            hkv as i32,
            s as i32,
            n as i32,
            p as i32,
            d as i32,
            slots as u32,
            scale,
            lse_off
        )?;
        return Ok((CudaStorage::wrap_cuda_slice(out, dev), shape));
    }
    let small = g <= 8 && super::attention_g8();
    let name: &'static str = match (dt, d, small) {
        (DType::BF16, 128, true) => "spa_mma_bf16_d128_g8",
        (DType::BF16, 128, false) => "spa_mma_bf16_d128_g16",
        (DType::BF16, _, true) => "spa_mma_bf16_d64_g8",
        (DType::BF16, _, false) => "spa_mma_bf16_d64_g16",
        (_, 128, true) => "spa_mma_f16_d128_g8",
        (_, 128, false) => "spa_mma_f16_d128_g16",
        (_, _, true) => "spa_mma_f16_d64_g8",
        (_, _, false) => "spa_mma_f16_d64_g16",
    };
    let f = func(&dev, &ATTENTION, name)?;
    let resident = (sm_count(&dev)? * super::occupancy(&f, name, THREADS)?) as usize * super::attention_waves();
    let units = t * hkv;
    let max_splits = n.div_ceil(MIN_PER_SPLIT).max(1);
    let splits = if units >= resident {
        1
    } else {
        (resident / units).clamp(1, max_splits)
    };
    let per_split = n.div_ceil(splits);
    let splits = n.div_ceil(per_split);
    let blocks = units * splits;
    if blocks > i32::MAX as usize {
        candle_core::bail!("{OP}: {blocks} blocks exceed the launch limit");
    }
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    if splits == 1 {
        launch!(
            f,
            super::cfg(blocks as u32, THREADS, 0),
            qp,
            pp,
            pages,
            queries,
            kv_limit,
            outp,
            0u64,
            hq as i32,
            hkv as i32,
            s as i32,
            n as i32,
            p as i32,
            slots as u32,
            1i32,
            per_split as i32,
            scale_log2,
            lse_off
        )?;
    } else {
        let rows = t * hq;
        let (part, partp) = alloc::<f32>(&dev, rows * splits * (d + 2))?;
        launch!(
            f,
            super::cfg(blocks as u32, THREADS, 0),
            qp,
            pp,
            pages,
            queries,
            kv_limit,
            outp,
            partp,
            hq as i32,
            hkv as i32,
            s as i32,
            n as i32,
            p as i32,
            slots as u32,
            splits as i32,
            per_split as i32,
            scale_log2,
            lse_off
        )?;
        let merge = func(&dev, &ATTENTION, "spa_merge")?;
        let rows_per_block = 4usize;
        launch!(
            merge,
            super::cfg(rows.div_ceil(rows_per_block) as u32, 32 * rows_per_block as u32, 0),
            partp,
            outp,
            rows as i32,
            splits as i32,
            d as i32,
            lse_off
        )?;
        // Freed in stream order, after the merge has read it.
        drop(part);
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

/// One thread per output element: the merged `[rows, D]` out, then the merged lse
/// `[rows]`, flat (see [`crate::ops::merge_partials`]).
pub(crate) fn merge_partials(
    a: &CudaStorage,
    al: &Layout,
    b: &CudaStorage,
    bl: &Layout,
    lse_a: &candle_core::Tensor,
    lse_b: &candle_core::Tensor,
) -> Result<(CudaStorage, Shape)> {
    const M: &str = "merge_partials";
    let rows = lse_a.elem_count();
    let d = al.shape().elem_count() / rows.max(1);
    let n = rows * (d + 1);
    let dev = super::device(a).clone();
    let (out, op) = alloc::<f32>(&dev, n)?;
    if rows > 0 {
        let f = func(&dev, &ATTENTION, "merge_partials_f32")?;
        launch!(
            f,
            super::cfg(n.div_ceil(256).min(65535) as u32, 256, 0),
            ptr(M, a, al)?,
            ptr(M, b, bl)?,
            super::field_ptr_of(M, "lse_a", lse_a, DType::F32)?,
            super::field_ptr_of(M, "lse_b", lse_b, DType::F32)?,
            op,
            rows as i32,
            d as i32
        )?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from_dims(&[n])))
}
