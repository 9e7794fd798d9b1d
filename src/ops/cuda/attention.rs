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
    if t == 0 {
        let (out, _) = alloc::<f32>(&dev, 1)?;
        return Ok((CudaStorage::wrap_cuda_slice(out, dev), shape));
    }
    let qp = ptr(OP, q, ql)?;
    let pages = super::field_ptr(OP, "pages", &list.pages)?;
    let queries = super::field_ptr(OP, "queries", &list.queries)?;
    let kv_limit = super::field_ptr(OP, "kv_limit", &list.kv_limit)?;
    let g = hq / hkv;
    let dt = q.dtype();
    let fast = mma_kernel_fits(dt, d, g) && qp % 16 == 0 && pp % 16 == 0;
    if !fast || n == 0 {
        if d > 512 {
            candle_core::bail!("{OP}: head_dim {d} > 512 is not supported on CUDA");
        }
        let (out, outp) = alloc::<f32>(&dev, t * hq * (d + 1))?;
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
    let geo = MmaLaunch {
        dev: &dev,
        qp,
        pp,
        pages,
        queries,
        kv_limit,
        t,
        hq,
        hkv,
        s,
        n,
        p,
        d,
        slots,
        scale,
        dtype: dt,
    };
    let (out, shape) = geo.launch(None)?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

/// Whether the tensor-core kernels (`spa_mma_*`, and the fused tiered `spa_tier_*`) take
/// queries of `dtype`, head dim `d` and GQA group `g` (16-byte aligned pools aside).
/// Elsewhere `sparse_paged_attention` takes the generic kernel and
/// [`crate::ops::tiered_paged_attention`] its composition of page copies and one attention.
pub(crate) fn mma_kernel_fits(dtype: DType, d: usize, g: usize) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && (d == 64 || d == 128) && (1..=16).contains(&g)
}

/// The fused tiered attention: `sparse_paged_attention` over the fast pool `fast`
/// (written: the fills) where each entry may instead name a host page
/// `src` `[S, Hkv, N]` u32 of `host`. Only for [`mma_kernel_fits`] cases.
pub(crate) fn tiered_paged_attention(
    q: &CudaStorage,
    ql: &Layout,
    fast: PoolRef,
    host: PoolRef,
    list: &PageList,
    src: &candle_core::Tensor,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "tiered_paged_attention";
    let (t, hq, d) = ql.shape().dims3()?;
    let (s, hkv, n, _) = list.pages.dims4()?;
    let qp = ptr(OP, q, ql)?;
    let (fp, fast_slots) = (fast.ptr, fast.slots);
    if fast.page_size != host.page_size || fast.head_dim != host.head_dim {
        candle_core::bail!("{OP}: fast pool pages {fast:?} and host pool pages {host:?} differ");
    }
    if !mma_kernel_fits(q.dtype(), d, hq / hkv)
        || host.head_dim != d
        || qp % 16 != 0
        || fp % 16 != 0
        || host.ptr % 16 != 0
    {
        candle_core::bail!(
            "{OP}: no fused kernel for q {:?} {:?} over pages of head dim {} (bf16/f16, D 64 or 128, at most 16 query heads per KV head, 16-byte aligned pools)",
            ql.dims(),
            q.dtype(),
            host.head_dim
        );
    }
    let dev = super::device(q).clone();
    let geo = MmaLaunch {
        dev: &dev,
        qp,
        pp: fp,
        pages: super::field_ptr(OP, "pages", &list.pages)?,
        queries: super::field_ptr(OP, "queries", &list.queries)?,
        kv_limit: super::field_ptr(OP, "kv_limit", &list.kv_limit)?,
        t,
        hq,
        hkv,
        s,
        n,
        p: host.page_size,
        d,
        slots: fast_slots,
        scale,
        dtype: q.dtype(),
    };
    let tier = (super::field_ptr(OP, "src", src)?, host.ptr, host.slots as u32);
    let (out, shape) = geo.launch(Some(tier))?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

/// The tensor-core kernel for a case (`kernels/attention.cu`'s instantiations).
fn kernel_name(tier: bool, dt: DType, d: usize, small: bool) -> &'static str {
    let bf16 = dt == DType::BF16;
    match (tier, bf16, d == 128, small) {
        (false, true, true, true) => "spa_mma_bf16_d128_g8",
        (false, true, true, false) => "spa_mma_bf16_d128_g16",
        (false, true, false, true) => "spa_mma_bf16_d64_g8",
        (false, true, false, false) => "spa_mma_bf16_d64_g16",
        (false, false, true, true) => "spa_mma_f16_d128_g8",
        (false, false, true, false) => "spa_mma_f16_d128_g16",
        (false, false, false, true) => "spa_mma_f16_d64_g8",
        (false, false, false, false) => "spa_mma_f16_d64_g16",
        (true, true, true, true) => "spa_tier_bf16_d128_g8",
        (true, true, true, false) => "spa_tier_bf16_d128_g16",
        (true, true, false, true) => "spa_tier_bf16_d64_g8",
        (true, true, false, false) => "spa_tier_bf16_d64_g16",
        (true, false, true, true) => "spa_tier_f16_d128_g8",
        (true, false, true, false) => "spa_tier_f16_d128_g16",
        (true, false, false, true) => "spa_tier_f16_d64_g8",
        (true, false, false, false) => "spa_tier_f16_d64_g16",
    }
}

/// One launch of the tensor-core kernel (plain, or fused tiered with `(src, host pool,
/// host slots)`) and, when it splits, the merge of its splits.
struct MmaLaunch<'a> {
    dev: &'a candle_core::cuda_backend::CudaDevice,
    qp: u64,
    pp: u64,
    pages: u64,
    queries: u64,
    kv_limit: u64,
    t: usize,
    hq: usize,
    hkv: usize,
    s: usize,
    n: usize,
    p: usize,
    d: usize,
    slots: usize,
    scale: f32,
    dtype: DType,
}

impl MmaLaunch<'_> {
    fn launch(
        &self,
        tier: Option<(u64, u64, u32)>,
    ) -> Result<(candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>, Shape)> {
        let &Self {
            dev,
            qp,
            pp,
            pages,
            queries,
            kv_limit,
            t,
            hq,
            hkv,
            s,
            n,
            p,
            d,
            slots,
            scale,
            ..
        } = self;
        let shape = Shape::from_dims(&[t * hq * (d + 1)]);
        let lse_off = (t * hq * d) as u64;
        let (out, outp) = alloc::<f32>(dev, t * hq * (d + 1))?;
        if t == 0 {
            return Ok((out, shape));
        }
        let small = hq / hkv <= 8 && super::attention_g8();
        let name = kernel_name(tier.is_some(), self.dtype, d, small);
        let f = func(dev, &ATTENTION, name)?;
        let resident = (sm_count(dev)? * super::occupancy(&f, name, THREADS)?) as usize * super::attention_waves();
        let units = t * hkv;
        let max_splits = n.div_ceil(MIN_PER_SPLIT).max(1);
        let splits = if units >= resident {
            1
        } else {
            (resident / units).clamp(1, max_splits)
        };
        let per_split = n.div_ceil(splits).max(1);
        let splits = n.div_ceil(per_split).max(1);
        let blocks = units * splits;
        if blocks > i32::MAX as usize {
            candle_core::bail!("{OP}: {blocks} blocks exceed the launch limit");
        }
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        let rows = t * hq;
        let part = if splits > 1 {
            Some(alloc::<f32>(dev, rows * splits * (d + 2))?)
        } else {
            None
        };
        let partp = part.as_ref().map_or(0u64, |(_, p)| *p);
        let c = super::cfg(blocks as u32, THREADS, 0);
        let (hq, hkv, s, n, p) = (hq as i32, hkv as i32, s as i32, n as i32, p as i32);
        let (splits_i, per_split) = (splits as i32, per_split as i32);
        let slots = slots as u32;
        match tier {
            None => launch!(
                f, c, qp, pp, pages, queries, kv_limit, outp, partp, hq, hkv, s, n, p, slots, splits_i, per_split,
                scale_log2, lse_off
            )?,
            Some((src, host, host_slots)) => launch!(
                f, c, qp, pp, pages, queries, kv_limit, outp, partp, hq, hkv, s, n, p, slots, splits_i, per_split,
                scale_log2, lse_off, src, host, host_slots
            )?,
        }
        if let Some((part, partp)) = part {
            let merge = func(dev, &ATTENTION, "spa_merge")?;
            // One block per row, a thread per output dim (at most 128 threads).
            launch!(
                merge,
                super::cfg(rows as u32, d.div_ceil(32).clamp(1, 4) as u32 * 32, 0),
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
        Ok((out, shape))
    }
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
