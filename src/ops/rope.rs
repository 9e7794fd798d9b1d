//! The rotary embedding of a step's queries and keys, and the contiguous copies of its
//! queries, keys and values, as one op ([`rope_qkv`]): one kernel on CUDA
//! (`rope_qkv_*` in `kernels/model_ops.cu`) where candle takes five (two contiguous
//! copies of the strided q and k views of a fused QKV projection, two rotations, one
//! copy of v). `cpu_fwd` is the reference: each rotated element is computed in f32 and
//! rounded to the dtype once.

use crate::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

const OP: &str = "rope_qkv";

/// Rotate-half RoPE ("non-interleaved", the Hugging Face Llama / Qwen2 convention) of `q`
/// and `k`, and `v` as it is: for `i < D/2`, `y[i] = x[i]·cos[i] − x[i+D/2]·sin[i]` and
/// `y[i+D/2] = x[i]·sin[i] + x[i+D/2]·cos[i]`, with the token's row of the tables.
///
/// Shapes: `q` `[T, Hq, D]`, `k` and `v` `[T, Hkv, D]` (any strides whose last one is 1,
/// such as views of one `[T, Hq + 2·Hkv, D]` projection), `cos` and `sin` `[T, D/2]`;
/// all one float dtype (f32, f16, bf16) and device, `D` even. Returns `(q_rot, k_rot,
/// v)`, contiguous views of one buffer.
pub fn rope_qkv(q: &Tensor, k: &Tensor, v: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (t, hq, d) = q.dims3().unwrap_or((0, 0, 0));
    let hkv = k.dims().get(1).copied().unwrap_or(0);
    let dt = q.dtype();
    let shapes_ok = q.rank() == 3
        && d % 2 == 0
        && d > 0
        && k.dims() == [t, hkv, d]
        && v.dims() == [t, hkv, d]
        && cos.dims() == [t, d / 2]
        && sin.dims() == [t, d / 2];
    let same = [k, v, cos, sin]
        .iter()
        .all(|x| x.dtype() == dt && x.device().same_device(q.device()));
    if !shapes_ok || !same || !matches!(dt, DType::F32 | DType::F16 | DType::BF16) {
        crate::invalid!(
            OP,
            "q [T, Hq, D], k and v [T, Hkv, D] (D even), cos and sin [T, D/2], one float dtype \
             and device: got q {:?} {:?}, k {:?} {:?}, v {:?} {:?}, cos {:?} {:?}, sin {:?} {:?}",
            q.dims(),
            dt,
            k.dims(),
            k.dtype(),
            v.dims(),
            v.dtype(),
            cos.dims(),
            cos.dtype(),
            sin.dims(),
            sin.dtype()
        );
    }
    // The kernel takes row and head strides; the last dimension must be dense.
    let dense_rows =
        |x: &Tensor| -> Result<Tensor> { Ok(if x.stride()[2] == 1 { x.clone() } else { x.contiguous()? }) };
    let op = RopeQkv {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
    };
    let flat = dense_rows(q)?.apply_op3_no_bwd(&dense_rows(k)?, &dense_rows(v)?, &op)?;
    let (nq, nk) = (t * hq * d, t * hkv * d);
    Ok((
        flat.narrow(0, 0, nq)?.reshape((t, hq, d))?,
        flat.narrow(0, nq, nk)?.reshape((t, hkv, d))?,
        flat.narrow(0, nq + nk, nk)?.reshape((t, hkv, d))?,
    ))
}

/// `(q, k, v)` → flat `[T·Hq·D + 2·T·Hkv·D]`: rotated q, rotated k, v.
struct RopeQkv {
    cos: Tensor,
    sin: Tensor,
}

/// Element `(t, h, j)` of a rank-3 operand with a dense last dimension, as f32.
fn strided_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<impl Fn(usize, usize, usize) -> f32 + 'a> {
    let (st, off) = (l.stride().to_vec(), l.start_offset());
    let idx = move |t: usize, h: usize, j: usize| off + t * st[0] + h * st[1] + j * st[2];
    Ok(move |t, h, j| match s {
        CpuStorage::F32(v) => v[idx(t, h, j)],
        CpuStorage::F16(v) => v[idx(t, h, j)].to_f32(),
        CpuStorage::BF16(v) => v[idx(t, h, j)].to_f32(),
        _ => f32::NAN,
    })
}

impl CustomOp3 for RopeQkv {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, hq, d) = ql.shape().dims3()?;
        let hkv = kl.dims()[1];
        let half = d / 2;
        let table = |x: &Tensor| -> candle_core::Result<Vec<f32>> { x.to_dtype(DType::F32)?.flatten_all()?.to_vec1() };
        let (cos, sin) = (table(&self.cos)?, table(&self.sin)?);
        let (q, k, v) = (strided_f32(qs, ql)?, strided_f32(ks, kl)?, strided_f32(vs, vl)?);
        let mut out = Vec::with_capacity(t * (hq + 2 * hkv) * d);
        for (x, heads, rotate) in [(&q, hq, true), (&k, hkv, true), (&v, hkv, false)] {
            for ti in 0..t {
                for h in 0..heads {
                    if !rotate {
                        out.extend((0..d).map(|j| x(ti, h, j)));
                        continue;
                    }
                    let (c, s) = (&cos[ti * half..][..half], &sin[ti * half..][..half]);
                    out.extend((0..half).map(|i| x(ti, h, i) * c[i] - x(ti, h, i + half) * s[i]));
                    out.extend((0..half).map(|i| x(ti, h, i) * s[i] + x(ti, h, i + half) * c[i]));
                }
            }
        }
        let n = out.len();
        Ok((super::util::float_storage(out, qs.dtype()), Shape::from_dims(&[n])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::model_ops::rope_qkv([(qs, ql), (ks, kl), (vs, vl)], &self.cos, &self.sin)
    }
}
