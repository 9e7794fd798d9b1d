//! Launch glue for `kernels/shadowkv.cu`: ShadowKV's landmark scores, page lists and key
//! rebuild on CUDA (used by the ops of [`crate::ops::shadowkv`]).

use super::{
    alloc, alloc_as, cfg3, field_ptr, field_ptr_of, func, launch, max_smem_optin, ptr, sm_count, suffix, SHADOWKV,
};
use crate::ops::shadowkv::{rebuild::Rebuild, ShadowKvGeometry};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

/// Chunks per split of the score kernels (their threads per block).
const SCORE_CHUNKS: usize = 128;
/// Warps per block of the tensor-core rebuild (SKV_WARPS).
const REBUILD_WARPS: usize = 4;

fn grid(op: &str, name: &str, n: usize, max: usize) -> Result<u32> {
    if n > max {
        candle_core::bail!("{op}: {name} = {n} exceeds the {max} a grid dimension allows");
    }
    Ok(n as u32)
}

/// Landmark scores `[B, Hkv, N]` f32 (see [`crate::ops::shadowkv::shadowkv_scores`]).
pub(crate) fn scores(
    q: &CudaStorage,
    ql: &Layout,
    lm: &CudaStorage,
    ll: &Layout,
    (outlier, cand, rows, chunks): (&Tensor, &Tensor, &Tensor, &Tensor),
    geo: &ShadowKvGeometry,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "shadowkv_scores";
    let (b, hq, d) = ql.shape().dims3()?;
    let slots = ll.dims()[0];
    let (_, hkv, n) = cand.dims3()?;
    let dev = super::device(q).clone();
    let (out, op) = alloc::<f32>(&dev, b * hkv * n)?;
    let shape = Shape::from_dims(&[b, hkv, n]);
    if b * hkv * n == 0 {
        return Ok((CudaStorage::wrap_cuda_slice(out, dev), shape));
    }
    let g = hq / hkv;
    let rows_n = b * hkv;
    // Splits of SCORE_CHUNKS chunks: a thread per chunk in each kernel.
    let splits = n.div_ceil(SCORE_CHUNKS);
    let (logits, lgp) = alloc::<f32>(&dev, rows_n * g * n)?;
    let (part, pp) = alloc::<f32>(&dev, rows_n * splits * 2 * g)?;
    let smem = (g * d + 32) * 4;
    if smem > 48 * 1024 {
        candle_core::bail!("{OP}: {g} query heads of dim {d} need {smem} bytes of shared memory (48 KiB at most)");
    }
    let grid2 = (
        grid(OP, "B·Hkv", rows_n, i32::MAX as usize)?,
        grid(OP, "splits", splits, 65535)?,
        1,
    );
    let (cp, rp, chp) = (
        field_ptr(OP, "candidates", cand)?,
        field_ptr(OP, "rows", rows)?,
        field_ptr(OP, "chunks", chunks)?,
    );
    let (window, owners) = (geo.window.min(i32::MAX as usize) as i32, chunks.dim(0)? as u32);
    // The narrowest per-head register width that holds the group.
    let mg = match g {
        0..=4 => 4,
        5..=8 => 8,
        _ => 16,
    };
    let name = format!("shadowkv_logits_{}_g{mg}", suffix(OP, q.dtype())?);
    let f = func(&dev, &SHADOWKV, &name)?;
    launch!(
        f,
        cfg3(grid2, SCORE_CHUNKS as u32, smem as u32),
        ptr(OP, q, ql)?,
        ptr(OP, lm, ll)?,
        cp,
        rp,
        chp,
        lgp,
        pp,
        hq as i32,
        hkv as i32,
        n as i32,
        d as i32,
        geo.page_size as i32,
        window,
        slots as u32,
        owners,
        scale,
        SCORE_CHUNKS as i32
    )?;
    let f = func(&dev, &SHADOWKV, "shadowkv_scores")?;
    launch!(
        f,
        cfg3(grid2, SCORE_CHUNKS as u32, 0),
        lgp,
        pp,
        field_ptr_of(OP, "outlier", outlier, DType::F32)?,
        cp,
        rp,
        chp,
        op,
        g as i32,
        hkv as i32,
        n as i32,
        geo.page_size as i32,
        window,
        slots as u32,
        owners,
        SCORE_CHUNKS as i32
    )?;
    drop((logits, part));
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

/// The selection `[B·Hkv·w]` then the pairs `[B·Hkv·K·2]`, flat u32 (see
/// [`crate::ops::shadowkv::shadowkv_lists`]).
pub(crate) fn lists(
    top: &CudaStorage,
    tl: &Layout,
    (rows, chunks, oids): (&Tensor, &Tensor, &Tensor),
    n: usize,
    w: usize,
    geo: &ShadowKvGeometry,
    with_top: bool,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "shadowkv_lists";
    let (b, hkv, k) = tl.shape().dims3()?;
    let n_out = oids.dim(2)?;
    let len = b * hkv * (w + 2 * k);
    let dev = super::device(top).clone();
    let (out, op) = alloc::<u32>(&dev, len)?;
    let shape = Shape::from_dims(&[len]);
    if b * hkv == 0 {
        return Ok((CudaStorage::wrap_cuda_slice(out, dev), shape));
    }
    let f = func(&dev, &SHADOWKV, "shadowkv_lists")?;
    let cfg = super::cfg(grid(OP, "B·Hkv", b * hkv, i32::MAX as usize)?, 128, 0);
    launch!(
        f,
        cfg,
        ptr(OP, top, tl)?,
        field_ptr(OP, "rows", rows)?,
        field_ptr(OP, "chunks", chunks)?,
        field_ptr(OP, "outlier_ids", oids)?,
        op,
        op + (b * hkv * w * 4) as u64,
        hkv as i32,
        k as i32,
        n as i32,
        n_out as i32,
        w as i32,
        geo.page_size as i32,
        geo.window.min(i32::MAX as usize) as i32,
        chunks.dim(0)? as u32,
        i32::from(with_top)
    )?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

/// Rebuilt pool `[B·Hkv·K, 2, P, D]` (see [`crate::ops::shadowkv::shadowkv_rebuild`]).
pub(crate) fn rebuild(
    left: &CudaStorage,
    ll: &Layout,
    right: &CudaStorage,
    rl: &Layout,
    op_: &Rebuild,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "shadowkv_rebuild";
    let (lps, p, r) = ll.shape().dims3()?;
    let (owners, _, hd) = rl.shape().dims3()?;
    let (b, hkv, k) = op_.top.dims3()?;
    let n = op_.candidates.dim(2)?;
    let d = hd / hkv;
    let dt = left.dtype();
    let entries = b * hkv * k;
    let dev = super::device(left).clone();
    let (out, outp) = alloc_as(OP, &dev, dt, entries * 2 * p * d)?;
    let shape = Shape::from_dims(&[entries, 2, p, d]);
    if entries * p * d == 0 {
        return Ok((out, shape));
    }
    let slots = op_.left_map.dim(0)?;
    let positions = op_.cos.dim(0)?;
    let (vp, vslots) = match &op_.values {
        Some(v) => {
            let (s, l) = v.storage_and_layout();
            match &*s {
                Storage::Cuda(c) => (ptr(OP, c, l)?, v.dim(0)?),
                _ => candle_core::bail!("{OP}: values {:?} must be on the CUDA device", v.dims()),
            }
        }
        None => (0u64, 0),
    };
    let sfx = suffix(OP, dt)?;
    let (lp, rp) = (ptr(OP, left, ll)?, ptr(OP, right, rl)?);
    let (tp, cp, rowp) = (
        field_ptr(OP, "top", &op_.top)?,
        field_ptr(OP, "candidates", &op_.candidates)?,
        field_ptr(OP, "rows", &op_.rows)?,
    );
    let mp = field_ptr_of(OP, "left_map", &op_.left_map, DType::F32)?;
    let (cosp, sinp) = (
        field_ptr_of(OP, "cos", &op_.cos, dt)?,
        field_ptr_of(OP, "sin", &op_.sin, dt)?,
    );
    let clamp = |x: usize| x.min(u32::MAX as usize) as u32;
    // The transposed right factor and a staging tile per warp, rows padded by 8.
    let smem = (d + 16 * REBUILD_WARPS) * (r + 8) * 2;
    let mma = matches!(dt, DType::BF16 | DType::F16)
        && (d == 64 || d == 128)
        && r % 16 == 0
        && smem <= max_smem_optin(&dev)?
        && lp % 16 == 0
        && rp % 16 == 0
        && vp % 16 == 0;
    if mma {
        let name = format!("shadowkv_rebuild_mma_{sfx}_d{d}");
        let f = func(&dev, &SHADOWKV, &name)?;
        if smem > 48 * 1024 {
            f.f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .w()?;
        }
        // Tiles per block: about eight blocks per SM over the launch (more than fit at
        // once: the warps are latency-bound), in whole rounds of the block's warps.
        let tiles = (k * p).div_ceil(16);
        let target = (sm_count(&dev)? as usize * 8).max(1);
        let per_row = target.div_ceil(b * hkv).max(1);
        let tpb = tiles.div_ceil(per_row).div_ceil(REBUILD_WARPS).max(1) * REBUILD_WARPS;
        let cfg = cfg3(
            (
                grid(OP, "B·Hkv", b * hkv, i32::MAX as usize)?,
                grid(OP, "tile runs", tiles.div_ceil(tpb), 65535)?,
                1,
            ),
            (REBUILD_WARPS * 32) as u32,
            smem as u32,
        );
        launch!(
            f,
            cfg,
            outp,
            lp,
            rp,
            tp,
            cp,
            rowp,
            mp,
            cosp,
            sinp,
            vp,
            hkv as i32,
            k as i32,
            n as i32,
            p as i32,
            r as i32,
            clamp(slots),
            clamp(lps),
            clamp(owners),
            clamp(positions),
            clamp(vslots),
            tpb as i32
        )?;
    } else {
        let f = func(&dev, &SHADOWKV, &format!("shadowkv_rebuild_generic_{sfx}"))?;
        let total = (entries * p * (d / 2)) as u64;
        let blocks = total.div_ceil(256).min(65535 * 8) as u32;
        launch!(
            f,
            super::cfg(blocks, 256, 0),
            outp,
            lp,
            rp,
            tp,
            cp,
            rowp,
            mp,
            cosp,
            sinp,
            vp,
            hkv as i32,
            k as i32,
            n as i32,
            p as i32,
            r as i32,
            d as i32,
            clamp(slots),
            clamp(lps),
            clamp(owners),
            clamp(positions),
            clamp(vslots),
            total
        )?;
    }
    Ok((out, shape))
}
