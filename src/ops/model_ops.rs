//! Fused ops of the decoder layers, one kernel each on CUDA (`kernels/model_ops.cu`)
//! where candle takes two or three: [`add_rms_norm`] (the residual add and the RMSNorm
//! after it), [`rms_norm`] (the norm alone) and [`silu_mul`] (SwiGLU's activation over a
//! fused gate/up projection), and [`logits_f32`] (the output projection of f16/bf16
//! weights with f32 logits, one cuBLAS GEMM with f32 output on CUDA). `cpu_fwd` is the
//! reference; the kernels round in the same places (the sum and SiLU's output to the
//! storage dtype, as candle's separate ops do).

use super::util::{float_storage as cpu_storage, float_values as cpu_f32};
use crate::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

/// `x` rounded to `dt` (f32, f16 or bf16) and back.
fn round_to(x: f32, dt: DType) -> f32 {
    match dt {
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::BF16 => bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

fn check(op: &'static str, x: &Tensor, others: &[(&str, &Tensor, &[usize])]) -> Result<()> {
    let ok_dtype = matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16);
    if x.rank() != 2 || x.dims()[1] == 0 || !ok_dtype {
        crate::invalid!(
            op,
            "x must be [T, H] (H >= 1) f32, f16 or bf16, got {:?} {:?}",
            x.dims(),
            x.dtype()
        );
    }
    for (name, t, dims) in others {
        if t.dims() != *dims || t.dtype() != x.dtype() || !t.device().same_device(x.device()) {
            crate::invalid!(
                op,
                "{name} must be {dims:?} {:?} on x's device (x {:?}), got {:?} {:?} on {:?}",
                x.dtype(),
                x.dims(),
                t.dims(),
                t.dtype(),
                t.device().location()
            );
        }
    }
    Ok(())
}

/// RMSNorm of each row: `y = x / sqrt(mean(x²) + eps) · alpha`, accumulated in f32.
/// Shapes: `x` `[T, H]` f32/f16/bf16, `alpha` `[H]` of the same dtype and device; `y`
/// `[T, H]` in that dtype.
pub fn rms_norm(x: &Tensor, alpha: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "rms_norm";
    let h = x.dims().get(1).copied().unwrap_or(0);
    check(OP, x, &[("alpha", alpha, &[h])])?;
    let op = AddRmsNorm {
        alpha: alpha.contiguous()?,
        eps,
    };
    Ok(x.contiguous()?.apply_op1_no_bwd(&op)?.reshape(x.dims())?)
}

/// The residual add and the RMSNorm after it: `s = x + delta` (rounded to the dtype, as
/// a separate add would store it) and `y = rms_norm(s, alpha, eps)`. Returns `(s, y)`.
/// Shapes: `x`, `delta` `[T, H]` f32/f16/bf16, `alpha` `[H]`, all one dtype and device;
/// `s` and `y` `[T, H]` in that dtype (contiguous views of one buffer).
pub fn add_rms_norm(x: &Tensor, delta: &Tensor, alpha: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    const OP: &str = "add_rms_norm";
    let h = x.dims().get(1).copied().unwrap_or(0);
    check(OP, x, &[("delta", delta, x.dims()), ("alpha", alpha, &[h])])?;
    let op = AddRmsNorm {
        alpha: alpha.contiguous()?,
        eps,
    };
    let flat = x.contiguous()?.apply_op2_no_bwd(&delta.contiguous()?, &op)?;
    let n = x.elem_count();
    Ok((
        flat.narrow(0, 0, n)?.reshape(x.dims())?,
        flat.narrow(0, n, n)?.reshape(x.dims())?,
    ))
}

/// SwiGLU's activation over a fused gate/up projection: `gu` `[T, 2I]` (gate in the first
/// `I` columns, up in the rest) → `[T, I]` `silu(gate) · up`, with SiLU's output rounded
/// to the dtype before the product (as separate ops store it). f32, f16 or bf16.
pub fn silu_mul(gu: &Tensor) -> Result<Tensor> {
    const OP: &str = "silu_mul";
    check(OP, gu, &[])?;
    let (t, two_i) = gu.dims2()?;
    if two_i % 2 != 0 {
        crate::invalid!(OP, "gu must be [T, 2I] with an even width, got {:?}", gu.dims());
    }
    Ok(gu.contiguous()?.apply_op1_no_bwd(&SiluMul)?.reshape((t, two_i / 2))?)
}

/// The output projection with f32 logits: `logits[t, v] = Σ_k x[t, k] · w[v, k]`, the
/// products of the f16/bf16 (or f32) inputs accumulated in f32, with no f32 copy of `w`
/// and no rounding of the logits to the weights' dtype (near-equal logits would tie).
/// Shapes: `x` `[T, H]`, `w` `[V, H]` of one dtype (f32, f16 or bf16) and device;
/// returns `[T, V]` f32.
pub fn logits_f32(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    const OP: &str = "logits_f32";
    let h = x.dims().get(1).copied().unwrap_or(0);
    let v = if w.rank() == 2 { w.dims()[0] } else { 0 };
    check(OP, x, &[("w", w, &[v, h])])?;
    let t = x.dims()[0];
    Ok(x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &LogitsF32)?
        .reshape((t, v))?)
}

/// `(x [T, H], w [V, H])` → `[T·V]` f32.
struct LogitsF32;

impl CustomOp2 for LogitsF32 {
    fn name(&self) -> &'static str {
        "logits_f32"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, h) = l.shape().dims2()?;
        let v = wl.dims()[0];
        let x = cpu_f32("logits_f32", s, l)?;
        let w = cpu_f32("logits_f32", ws, wl)?;
        let mut out = Vec::with_capacity(t * v);
        for xr in x.chunks(h.max(1)).take(t) {
            out.extend(
                w.chunks(h.max(1))
                    .take(v)
                    .map(|wr| xr.iter().zip(wr).map(|(a, b)| a * b).sum::<f32>()),
            );
        }
        Ok((CpuStorage::F32(out), Shape::from_dims(&[t * v])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::model_ops::logits_f32(s, l, ws, wl)
    }
}

/// Op1: `x` → `[T·H]` the norm. Op2: `(x, delta)` → `[2·T·H]` the sum, then the norm.
struct AddRmsNorm {
    alpha: Tensor,
    eps: f32,
}

impl AddRmsNorm {
    fn cpu(&self, x: Vec<f32>, delta: Option<Vec<f32>>, dt: DType, cols: usize) -> candle_core::Result<CpuStorage> {
        let alpha = super::util::float_field("add_rms_norm", "alpha", &self.alpha)?;
        let n = x.len();
        let sum: Vec<f32> = match &delta {
            Some(d) => x.iter().zip(d).map(|(&a, &b)| round_to(a + b, dt)).collect(),
            None => x,
        };
        let mut out = Vec::with_capacity(if delta.is_some() { 2 * n } else { n });
        if delta.is_some() {
            out.extend_from_slice(&sum);
        }
        for row in sum.chunks(cols.max(1)) {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / cols as f32;
            let scale = 1.0 / (ms + self.eps).sqrt();
            out.extend(row.iter().zip(&alpha).map(|(v, a)| v * scale * a));
        }
        Ok(cpu_storage(out, dt))
    }
}

impl CustomOp1 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "rms_norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let cols = l.dims()[1];
        let x = cpu_f32("rms_norm", s, l)?;
        let n = x.len();
        Ok((self.cpu(x, None, s.dtype(), cols)?, Shape::from_dims(&[n])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::model_ops::add_rms_norm(s, l, None, &self.alpha, self.eps)
    }
}

impl CustomOp2 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add_rms_norm"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let cols = l.dims()[1];
        let x = cpu_f32("add_rms_norm", s, l)?;
        let d = cpu_f32("add_rms_norm", ds, dl)?;
        let n = x.len();
        Ok((self.cpu(x, Some(d), s.dtype(), cols)?, Shape::from_dims(&[2 * n])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        ds: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::model_ops::add_rms_norm(s, l, Some((ds, dl)), &self.alpha, self.eps)
    }
}

/// `[T, 2I]` → `[T·I]`.
struct SiluMul;

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu_mul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, two_i) = l.shape().dims2()?;
        let i = two_i / 2;
        let gu = cpu_f32("silu_mul", s, l)?;
        let dt = s.dtype();
        let mut out = Vec::with_capacity(t * i);
        for row in gu.chunks(two_i.max(1)) {
            let (g, u) = row.split_at(i);
            out.extend(g.iter().zip(u).map(|(&g, &u)| round_to(g / (1.0 + (-g).exp()), dt) * u));
        }
        Ok((cpu_storage(out, dt), Shape::from_dims(&[t * i])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::model_ops::silu_mul(s, l)
    }
}
