//! Launch glue for `kernels/topk.cu`: exact per-row top-k on CUDA (used by
//! [`topk_indices`](crate::ops::topk_indices)).

use super::{alloc, func, launch, max_smem_optin, ptr, TOPK};
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, Layout, Result, Shape};

const OP: &str = "topk_indices";
/// Bytes of the kernel's `TopkShared` header, rounded up to 16.
const HEADER: usize = ((256 + 32 + 4) * 4usize).div_ceil(16) * 16;
/// Most entries one row may select on the GPU (the sort buffer lives in shared memory).
pub(crate) const MAX_SELECT: usize = 16384;

/// Top-`k` indices `[R, k]` u32 of `scores` `[R, N]` f32, or `None` when
/// `min(k, N) > MAX_SELECT` (the caller then falls back to the CPU).
pub(crate) fn topk(s: &CudaStorage, l: &Layout, k: usize) -> Result<Option<(CudaStorage, Shape)>> {
    let (r, n) = l.shape().dims2()?;
    let sel = k.min(n).max(1);
    let cap = sel.next_power_of_two();
    if cap > MAX_SELECT {
        return Ok(None);
    }
    let dev = super::device(s).clone();
    let limit = max_smem_optin(&dev)?;
    let base = HEADER + cap * 8;
    if base + 64 > limit {
        return Ok(None);
    }
    // PAD: slack after the last buffer (the compiler may read a few words ahead).
    const PAD: usize = 64;
    let staged = base + n * 4 + PAD <= limit;
    let smem = if staged { base + n * 4 + PAD } else { base + PAD };
    let (out, op) = alloc::<u32>(&dev, r * k)?;
    let shape = Shape::from_dims(&[r, k]);
    if r == 0 {
        return Ok(Some((CudaStorage::wrap_cuda_slice(out, dev), shape)));
    }
    let sp = ptr(OP, s, l)?;
    let f = func(&dev, &TOPK, "topk_rows")?;
    if smem > 48 * 1024 {
        f.f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
    }
    let threads = if n >= 8192 { 1024 } else { 512 };
    launch!(
        f,
        super::cfg(r as u32, threads, smem as u32),
        sp,
        op,
        n as i32,
        k as i32,
        cap as i32,
        staged as i32
    )?;
    Ok(Some((CudaStorage::wrap_cuda_slice(out, dev), shape)))
}
