//! Launch glue for `kernels/append.cu`: paged append of K/V rows and the Quest min/max
//! metadata update (used by [`paged_append`](crate::ops::paged_append) and
//! [`quest_meta_update`](crate::ops::quest_meta_update) on CUDA).

use super::{cfg, func, launch, ptr, ptr_mut, suffix, word_bytes, APPEND};
use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, Layout, Result, Tensor};

const OP_APPEND: &str = "paged_append";
const OP_META: &str = "quest_meta_update";

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
    let entries = dst.elem_count();
    if entries == 0 {
        return Ok(());
    }
    let es = pool.dtype().size_in_bytes();
    let pp = ptr_mut(OP_APPEND, pool, pl)?;
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

/// Widens (or, at row 0, resets) each page's element-wise key bounds.
pub(crate) fn quest_meta_update(
    meta: &mut CudaStorage,
    ml: &Layout,
    k: &CudaStorage,
    kl: &Layout,
    dst: &Tensor,
    page_size: usize,
) -> Result<()> {
    let (slots, _, d) = ml.shape().dims3()?;
    let (t, h, _) = kl.shape().dims3()?;
    if t * h == 0 {
        return Ok(());
    }
    let name = format!("quest_meta_update_{}", suffix(OP_META, meta.dtype())?);
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
