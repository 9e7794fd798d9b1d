//! Launch glue for `kernels/append.cu`: paged append of K/V rows, the Quest min/max
//! metadata update, and the two fused (used by [`paged_append`](crate::ops::paged_append),
//! [`quest_meta_update`](crate::ops::quest_meta_update) and
//! [`paged_append_with_minmax`](crate::ops::paged_append_with_minmax) on CUDA).

use super::{cfg, func, launch, ptr, ptr_mut, suffix, word_bytes, APPEND};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::{CudaStorage, DType, Layout, Result, Storage, Tensor};

const OP_APPEND: &str = "paged_append";
const OP_META: &str = "quest_meta_update";
const OP_FUSED: &str = "paged_append_with_minmax";

/// `pool[slot, 0|1, row] = k|v[t, h]` for every `dst[t, h] = slot * P + row` (NONE skips).
#[allow(clippy::too_many_arguments)]
pub(crate) fn paged_append(
    pool: &mut CudaStorage,
    pl: &Layout,
    k: &CudaStorage,
    kl: &Layout,
    v: &CudaStorage,
    vl: &Layout,
    dst: &Tensor,
    page_size: usize,
) -> Result<()> {
    let (slots, _, _, d) = pl.shape().dims4()?;
    let pp = ptr_mut(OP_APPEND, pool, pl)?;
    paged_append_to(pp, slots, page_size, d, k, kl, v, vl, dst)
}

/// [`paged_append`] into the pool `[slots, 2, page_size, d]` (k's dtype) at device
/// address `pp`: a candle tensor's buffer or mapped pinned host memory (the rows are then
/// written over PCIe by the kernel, enqueued on k's stream).
#[allow(clippy::too_many_arguments)]
pub(crate) fn paged_append_to(
    pp: u64,
    slots: usize,
    page_size: usize,
    d: usize,
    k: &CudaStorage,
    kl: &Layout,
    v: &CudaStorage,
    vl: &Layout,
    dst: &Tensor,
) -> Result<()> {
    let entries = dst.elem_count();
    if entries == 0 {
        return Ok(());
    }
    let es = k.dtype().size_in_bytes();
    let kp = ptr(OP_APPEND, k, kl)?;
    let vp = ptr(OP_APPEND, v, vl)?;
    let dp = super::field_ptr(OP_APPEND, "dst", dst)?;
    let row_bytes = d * es;
    let w = word_bytes(row_bytes, &[pp, kp, vp]);
    let name = match w {
        16 => "paged_append_w16",
        4 => "paged_append_w4",
        _ => "paged_append_w2",
    };
    let dev = super::device(k).clone();
    let f = func(&dev, &APPEND, name)?;
    let warps_per_block = 8u32;
    let blocks = (entries as u32).div_ceil(warps_per_block).min(65535);
    launch!(
        f,
        cfg(blocks, 32 * warps_per_block, 0),
        pp,
        kp,
        vp,
        dp,
        entries as i32,
        page_size as u32,
        (row_bytes / w) as i32,
        slots as u32
    )
}

/// Widens (or, at row 0, resets) each page's element-wise key bounds (`[slots, 2, d]` in
/// k's dtype, or int8 bounds `[slots, 2·d + 16]` u8).
pub(crate) fn quest_meta_update(
    meta: &mut CudaStorage,
    ml: &Layout,
    k: &CudaStorage,
    kl: &Layout,
    dst: &Tensor,
    page_size: usize,
) -> Result<()> {
    let slots = ml.dims()[0];
    let (t, h, d) = kl.shape().dims3()?;
    if t * h == 0 {
        return Ok(());
    }
    let q8 = if meta.dtype() == DType::U8 { "q8_" } else { "" };
    let name = format!("quest_meta_update_{q8}{}", suffix(OP_META, k.dtype())?);
    let mp = ptr_mut(OP_META, meta, ml)?;
    let kp = ptr(OP_META, k, kl)?;
    let dp = super::field_ptr(OP_META, "dst", dst)?;
    let dev = super::device(k).clone();
    let f = func(&dev, &APPEND, &name)?;
    let threads = (d.next_power_of_two().clamp(32, 256)) as u32;
    launch!(
        f,
        cfg((t * h) as u32, threads, 0),
        mp,
        kp,
        dp,
        t as i32,
        h as i32,
        d as i32,
        page_size as u32,
        slots as u32
    )
}

/// Fused [`paged_append`] into `pool` (through `pool_dst`, fast-tier slots) and
/// [`quest_meta_update`] of `meta` (through `meta_dst`, host slots): one launch, one block
/// per (token, head) entry.
///
/// `meta` is written through the device address of a tensor the op holds (candle's
/// in-place ops lock one destination); that is sound because the launch is ordered on the
/// candle device's stream like every other op, and the public function checked that
/// `meta` shares no buffer with `pool`, `k` or `v`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn paged_append_minmax(
    pool: &mut CudaStorage,
    pl: &Layout,
    k: &CudaStorage,
    kl: &Layout,
    v: &CudaStorage,
    vl: &Layout,
    pool_dst: &Tensor,
    meta: &Tensor,
    meta_dst: &Tensor,
) -> Result<()> {
    let (pool_slots, _, page_size, d) = pl.shape().dims4()?;
    let (t, h, _) = kl.shape().dims3()?;
    let meta_slots = meta.dims()[0];
    if t * h == 0 {
        return Ok(());
    }
    let q8 = if meta.dtype() == DType::U8 { "q8_" } else { "" };
    let name = format!("paged_append_minmax_{q8}{}", suffix(OP_FUSED, pool.dtype())?);
    let es = pool.dtype().size_in_bytes();
    let pp = ptr_mut(OP_FUSED, pool, pl)?;
    let kp = ptr(OP_FUSED, k, kl)?;
    let vp = ptr(OP_FUSED, v, vl)?;
    let mp = meta_ptr(meta)?;
    let pdp = super::field_ptr(OP_FUSED, "pool_dst", pool_dst)?;
    let mdp = super::field_ptr(OP_FUSED, "meta_dst", meta_dst)?;
    let w = word_bytes(d * es, &[pp, kp, vp]);
    let dev = super::device(k).clone();
    let f = func(&dev, &APPEND, &name)?;
    let threads = (d.next_power_of_two().clamp(32, 256)) as u32;
    launch!(
        f,
        cfg(((t * h) as u32).min(1 << 20), threads, 0),
        pp,
        mp,
        kp,
        vp,
        pdp,
        mdp,
        t as i32,
        h as i32,
        d as i32,
        page_size as u32,
        pool_slots as u32,
        meta_slots as u32,
        w as i32
    )
}

/// Device address of the metadata tensor (float or int8 bounds, contiguous, on the op's GPU).
fn meta_ptr(meta: &Tensor) -> Result<u64> {
    let (s, l) = meta.storage_and_layout();
    match &*s {
        Storage::Cuda(c) => ptr(OP_FUSED, c, l),
        _ => candle_core::bail!(
            "{OP_FUSED}: meta {:?} must be on the CUDA device of the op",
            meta.dims()
        ),
    }
}

/// The device buffer behind a CUDA tensor, as (first byte, one past the last byte).
pub(crate) fn buffer_range(op: &str, t: &Tensor) -> Result<(u64, u64)> {
    let (s, _) = t.storage_and_layout();
    let Storage::Cuda(c) = &*s else {
        candle_core::bail!("{op}: tensor {:?} is not on a CUDA device", t.dims());
    };
    let stream = c.device.cuda_stream();
    macro_rules! r {
        ($t:ty) => {{
            let sl = c.as_cuda_slice::<$t>()?;
            let (p, _sync) = sl.device_ptr(&stream);
            (p, p + (sl.len() * std::mem::size_of::<$t>()) as u64)
        }};
    }
    Ok(match c.dtype() {
        DType::F32 => r!(f32),
        DType::F16 => r!(half::f16),
        DType::BF16 => r!(half::bf16),
        DType::U32 => r!(u32),
        DType::U8 => r!(u8),
        dt => candle_core::bail!("{op}: unsupported dtype {dt:?} on CUDA"),
    })
}
