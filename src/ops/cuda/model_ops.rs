//! Launch glue for `kernels/model_ops.cu`: [`add_rms_norm`](crate::ops::add_rms_norm),
//! [`rms_norm`](crate::ops::rms_norm), [`silu_mul`](crate::ops::silu_mul) and
//! [`rope_qkv`](crate::ops::rope_qkv) and [`rope_tables_into`](crate::ops::rope_tables_into) on CUDA,
//! and [`logits_f32`](crate::ops::logits_f32) as one cuBLAS `GemmEx` with f32 output.

use super::{alloc_as, cfg, func, launch, ptr, strided_ptr, suffix, MODEL_OPS};
use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, DType, Layout, Result, Shape};

/// `x` `[T, H]` (+ `delta` `[T, H]`) → flat `[T·H]` the norm, or `[2·T·H]` the sum then
/// the norm (one block per row; 16-byte accesses where the rows and pointers allow).
pub(crate) fn add_rms_norm(
    x: &CudaStorage,
    xl: &Layout,
    delta: Option<(&CudaStorage, &Layout)>,
    alpha: &candle_core::Tensor,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "add_rms_norm";
    let (t, h) = xl.shape().dims2()?;
    let dt = x.dtype();
    let n = t * h;
    let parts = if delta.is_some() { 2 } else { 1 };
    let dev = super::device(x).clone();
    let (out, op) = alloc_as(OP, &dev, dt, parts * n)?;
    if n > 0 {
        let esz = dt.size_in_bytes() as u64;
        let (dp, sum, norm) = match delta {
            Some((d, dl)) => (ptr(OP, d, dl)?, op, op + n as u64 * esz),
            None => (0u64, 0u64, op),
        };
        let (xp, ap) = (ptr(OP, x, xl)?, super::field_ptr_of(OP, "alpha", alpha, dt)?);
        // 16-byte chunks when every row and pointer allows them and a row fits the vector
        // kernel's registers (RN_CHUNKS = 4 chunks per thread, 1024 threads).
        let per_chunk = 16 / esz as usize;
        let chunks = h / per_chunk;
        let aligned = [xp, dp, ap, sum, norm].iter().all(|p| p % 16 == 0);
        let (name, threads) = if h % per_chunk == 0 && aligned && chunks <= 4 * 1024 {
            ("add_rms_norm_vec", chunks.min(1024).div_ceil(32) as u32 * 32)
        } else {
            ("add_rms_norm", h.div_ceil(32).clamp(1, 8) as u32 * 32)
        };
        let f = func(&dev, &MODEL_OPS, &format!("{name}_{}", suffix(OP, dt)?))?;
        launch!(f, cfg(t as u32, threads, 0), xp, dp, ap, sum, norm, h as i32, eps)?;
    }
    Ok((out, Shape::from_dims(&[parts * n])))
}

/// `gu` `[T, 2I]` → flat `[T·I]` `silu(gate) · up`.
pub(crate) fn silu_mul(gu: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "silu_mul";
    let (t, two_i) = l.shape().dims2()?;
    let (dt, i) = (gu.dtype(), two_i / 2);
    let n = t * i;
    let dev = super::device(gu).clone();
    let (out, op) = alloc_as(OP, &dev, dt, n)?;
    if n > 0 {
        let f = func(&dev, &MODEL_OPS, &format!("silu_mul_{}", suffix(OP, dt)?))?;
        launch!(
            f,
            cfg(n.div_ceil(256).min(4096) as u32, 256, 0),
            ptr(OP, gu, l)?,
            op,
            t as i32,
            i as i32
        )?;
    }
    Ok((out, Shape::from_dims(&[n])))
}

/// `[(q, layout), (k, layout), (v, layout)]` (rank 3, dense last dimension) → flat
/// `[T·Hq·D + 2·T·Hkv·D]`: rotated q, rotated k, v (one block per token).
pub(crate) fn rope_qkv(
    qkv: [(&CudaStorage, &Layout); 3],
    cos: &candle_core::Tensor,
    sin: &candle_core::Tensor,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "rope_qkv";
    let [(q, ql), (k, kl), (v, vl)] = qkv;
    let (t, hq, d) = ql.shape().dims3()?;
    let hkv = kl.dims()[1];
    let dt = q.dtype();
    let n = t * (hq + 2 * hkv) * d;
    let dev = super::device(q).clone();
    let (out, op) = alloc_as(OP, &dev, dt, n)?;
    if n > 0 {
        let f = func(&dev, &MODEL_OPS, &format!("rope_qkv_{}", suffix(OP, dt)?))?;
        let st = |l: &Layout| (l.stride()[0] as i64, l.stride()[1] as i64);
        let ((qs0, qs1), (ks0, ks1), (vs0, vs1)) = (st(ql), st(kl), st(vl));
        let work = (hq + 2 * hkv) * d / 2;
        let threads = work.div_ceil(32).clamp(1, 8) as u32 * 32;
        // A thread per (head, i) pair of each token: blocks (t, y).
        let mut c = cfg(t as u32, threads, 0);
        c.grid_dim.1 = work.div_ceil(threads as usize).clamp(1, 65_535) as u32;
        launch!(
            f,
            c,
            strided_ptr(OP, q, ql)?,
            qs0,
            qs1,
            strided_ptr(OP, k, kl)?,
            ks0,
            ks1,
            strided_ptr(OP, v, vl)?,
            vs0,
            vs1,
            super::field_ptr_of(OP, "cos", cos, dt)?,
            super::field_ptr_of(OP, "sin", sin, dt)?,
            op,
            t as i32,
            hq as i32,
            hkv as i32,
            d as i32
        )?;
    }
    Ok((out, Shape::from_dims(&[n])))
}

/// One thread per (row, frequency): [`crate::ops::rope_tables_into`].
pub(crate) fn rope_tables(t: &mut CudaStorage, tl: &Layout, p: &CudaStorage, pl: &Layout, theta: f64) -> Result<()> {
    const OP: &str = "rope_tables_into";
    let (_, b, half) = tl.shape().dims3()?;
    let n = b * half;
    if n == 0 {
        return Ok(());
    }
    if n > i32::MAX as usize {
        candle_core::bail!("{OP}: [{b}, {half}] tables exceed the launch limit");
    }
    let dev = super::device(p).clone();
    let f = func(&dev, &MODEL_OPS, &format!("rope_tables_{}", suffix(OP, t.dtype())?))?;
    let blocks = n.div_ceil(256).min(65535) as u32;
    launch!(
        f,
        cfg(blocks, 256, 0),
        ptr(OP, p, pl)?,
        super::ptr_mut(OP, t, tl)?,
        b as i32,
        half as i32,
        theta
    )
}

/// `x` `[T, H]` and `w` `[V, H]` (one dtype) → flat `[T·V]` f32 `x · wᵀ`: cuBLAS `GemmEx`
/// on the device's stream and handle (those candle's matmuls use, so graph capture sees
/// it the same way), inputs in their dtype, f32 accumulation and output.
pub(crate) fn logits_f32(x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
    use cudarc::cublas::{result::gemm_ex, sys};
    const OP: &str = "logits_f32";
    let (t, h) = xl.shape().dims2()?;
    let v = wl.dims()[0];
    let dev = super::device(x).clone();
    let (out, op) = alloc_as(OP, &dev, DType::F32, t * v)?;
    if t * v == 0 {
        return Ok((out, Shape::from_dims(&[t * v])));
    }
    let ty = match x.dtype() {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        dt => candle_core::bail!("{OP}: unsupported dtype {dt:?}"),
    };
    let to_i32 = |n: usize, what: &str| {
        i32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{OP}: {what} = {n} exceeds cuBLAS's i32")))
    };
    let (m, n, k) = (to_i32(v, "vocab")?, to_i32(t, "rows")?, to_i32(h, "hidden")?);
    let (xp, wp) = (ptr(OP, x, xl)?, ptr(OP, w, wl)?);
    let (one, zero) = (1f32, 0f32);
    let blas = dev.cublas_handle();
    // Column-major: logitsᵀ [V, T] = (w as [H, V])ᵀ · (x as [H, T]).
    // SAFETY: the pointers are live device buffers of the shapes above (w: V·H, x: T·H,
    // out: T·V elements) on the handle's stream; alpha and beta are host f32 scalars, as
    // the handle's default pointer mode expects.
    unsafe {
        gemm_ex(
            *blas.handle(),
            sys::cublasOperation_t::CUBLAS_OP_T,
            sys::cublasOperation_t::CUBLAS_OP_N,
            m,
            n,
            k,
            &one as *const f32 as *const std::ffi::c_void,
            wp as *const std::ffi::c_void,
            ty,
            k,
            xp as *const std::ffi::c_void,
            ty,
            k,
            &zero as *const f32 as *const std::ffi::c_void,
            op as *mut std::ffi::c_void,
            sys::cudaDataType::CUDA_R_32F,
            m,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| candle_core::Error::Msg(format!("{OP}: cuBLAS GemmEx [{t}, {h}] x [{v}, {h}]ᵀ: {e:?}")))?;
    Ok((out, Shape::from_dims(&[t * v])))
}
