//! Launch glue for `kernels/prefill.cu` and `kernels/prefill_wgmma.cu`: the tensor-core
//! prefill attention (used by [`prefill_attention`](crate::ops::prefill_attention)). One
//! `prefill_init` launch writes the empty state into every row, then one block per
//! (tile, KV head) overwrites the rows of its tile:
//! - on a compute capability 9.0 device, for head dims 64 and 128, the wgmma kernel
//!   (2 warpgroups, (128 + 4 · 64) · D · 2 bytes + 1 KB of dynamic shared memory), unless
//!   [`set_prefill_wgmma`](super::set_prefill_wgmma) turned it off; its ping-pong
//!   variant where most keys are earlier pages (see
//!   [`set_prefill_pingpong`](super::set_prefill_pingpong));
//! - otherwise the mma.sync kernel (4 warps, (128 + 4 · 64) · (D + 8) · 2 bytes).

use super::{alloc, func, launch, ptr, PREFILL, PREFILL_WGMMA};
use crate::ops::kernel_consts::{PREFILL_ROWS, PREFILL_TILE_WORDS};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Tensor};

const OP: &str = "prefill_attention";
/// The mma.sync kernel: one warp per 32 query rows.
const THREADS: u32 = (PREFILL_ROWS / 32 * 32) as u32;
/// The wgmma kernel: two warpgroups of 64 query rows each.
const WGMMA_THREADS: u32 = 256;
/// Keys per shared-memory tile (`PF_BC` in the kernel).
const KEYS: usize = 64;

/// The op's tensors other than `q`, `k` and `v` (all on the CUDA device, contiguous).
pub(crate) struct Fields<'a> {
    pub pool: &'a Tensor,
    pub pages: &'a Tensor,
    pub kv_limit: &'a Tensor,
    pub tiles: &'a Tensor,
    /// [`PrefillTiles::mostly_earlier_pages`](crate::ops::PrefillTiles::mostly_earlier_pages).
    pub mostly_earlier_pages: bool,
}

/// Flat `[T·Hq·D + T·Hq]` f32: the output `[T, Hq, D]`, then the lse `[T, Hq]`.
pub(crate) fn prefill_attention(
    (q, ql): (&CudaStorage, &Layout),
    (k, kl): (&CudaStorage, &Layout),
    (v, vl): (&CudaStorage, &Layout),
    f: Fields<'_>,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let (t, hq, d) = ql.shape().dims3()?;
    let hkv = kl.shape().dims3()?.1;
    let (slots, _, p, _) = f.pool.dims4()?;
    let (s, _, n, _) = f.pages.dims4()?;
    let nt = f.tiles.dims2()?.0;
    let dev = super::device(q).clone();
    let (out, outp) = alloc::<f32>(&dev, t * hq * (d + 1))?;
    let shape = Shape::from_dims(&[t * hq * (d + 1)]);
    let (out_elems, lse_elems) = ((t * hq * d) as u64, (t * hq) as u64);
    let init = func(&dev, &PREFILL, "prefill_init")?;
    let blocks = ((out_elems + lse_elems).div_ceil(4 * 256)).clamp(1, 4096) as u32;
    launch!(init, super::cfg(blocks, 256, 0), outp, out_elems, lse_elems)?;
    if nt == 0 || t == 0 {
        return Ok((CudaStorage::wrap_cuda_slice(out, dev), shape));
    }
    let (qp, kp, vp) = (ptr(OP, q, ql)?, ptr(OP, k, kl)?, ptr(OP, v, vl)?);
    let pp = super::field_ptr_of(OP, "pool", f.pool, q.dtype())?;
    if [qp, kp, vp, pp].iter().any(|a| a % 16 != 0) {
        candle_core::bail!("{OP}: q, k, v and pool must start 16-byte aligned on CUDA");
    }
    // Entry names follow the storage type and head dim: `prefill_{bf16|f16}_d{D}` (mma.sync,
    // D = 64/96/128) and `prefill_wgmma_{bf16|f16}_d{D}` (D = 64/128; that module has
    // kernels only when built for compute capability 9.0).
    let dt = match q.dtype() {
        DType::BF16 => Some("bf16"),
        DType::F16 => Some("f16"),
        _ => None,
    };
    let Some(name) = dt
        .map(|dt| format!("prefill_{dt}_d{d}"))
        .filter(|n| PREFILL.entries.contains(&n.as_str()))
    else {
        candle_core::bail!(
            "{OP}: {:?} with head dim {d} has no CUDA kernel (f16/bf16, 64/96/128)",
            q.dtype()
        );
    };
    let blocks = nt * hkv;
    if blocks > i32::MAX as usize || f.tiles.dims2()?.1 != PREFILL_TILE_WORDS {
        candle_core::bail!("{OP}: {nt} tiles × {hkv} KV heads exceed the launch limit");
    }
    let ping = match super::prefill_pingpong() {
        super::PrefillPingPong::Auto if f.mostly_earlier_pages => "pp_",
        super::PrefillPingPong::Always => "pp_",
        _ => "",
    };
    let wgmma = dt.map(|dt| format!("prefill_wgmma_{ping}{dt}_d{d}"));
    let wgmma = match wgmma {
        Some(w)
            if super::prefill_wgmma()
                && PREFILL_WGMMA.entries.contains(&w.as_str())
                && super::module_loadable(&dev, &PREFILL_WGMMA)? =>
        {
            Some(w)
        }
        _ => None,
    };
    // The block's Q rows and two stages of K and V tiles: swizzled (plus slack to align
    // them to 1 KB) for wgmma, rows padded by 8 elements for mma.sync.
    let (kernel, threads, smem) = match wgmma {
        Some(w) => (
            func(&dev, &PREFILL_WGMMA, &w)?,
            WGMMA_THREADS,
            (PREFILL_ROWS + 4 * KEYS) * d * 2 + 1024,
        ),
        None => (
            func(&dev, &PREFILL, &name)?,
            THREADS,
            (PREFILL_ROWS + 4 * KEYS) * (d + 8) * 2,
        ),
    };
    if smem > 48 * 1024 {
        kernel
            .f
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .w()?;
    }
    launch!(
        kernel,
        super::cfg(blocks as u32, threads, smem as u32),
        qp,
        kp,
        vp,
        pp,
        super::field_ptr(OP, "pages", f.pages)?,
        super::field_ptr(OP, "kv_limit", f.kv_limit)?,
        super::field_ptr(OP, "tiles", f.tiles)?,
        outp,
        hq as i32,
        hkv as i32,
        s as i32,
        n as i32,
        p as i32,
        slots as u32,
        scale * std::f32::consts::LOG2_E,
        out_elems
    )?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}
