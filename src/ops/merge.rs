//! Exact combination of partial attention states (flash-decoding's merge), as one op:
//! `cpu_fwd` is the reference, `cuda_fwd` one kernel (`merge_partials_f32` in
//! `kernels/attention.cu`) instead of a dozen element-wise launches.

use super::attention::AttentionPartial;
use crate::Result;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};

const OP: &str = "merge_partials";

/// The merge of one row's two states: `(weight of a, weight of b, merged lse)`.
/// Kept in f32 in this order of operations, as the kernel computes it.
fn weights(la: f32, lb: f32) -> (f32, f32, f32) {
    let m = la.max(lb);
    let (wa, wb) = ((la - m).exp(), (lb - m).exp());
    let s = wa + wb;
    (wa / s, wb / s, m + s.ln())
}

/// Merges two partial states over disjoint key sets into the state over their union:
/// `lse = log(exp(lse_a) + exp(lse_b))`, `out = (out_a·exp(lse_a) + out_b·exp(lse_b)) / exp(lse)`.
/// A state that attended nothing has `lse` = [`EMPTY_LSE`](super::EMPTY_LSE) and weighs
/// nothing next to one that did.
///
/// Shapes: `out` `[T, Hq, D]` f32, `lse` `[T, Hq]` f32, equal in `a` and `b`, all on one
/// device. The result's `out` and `lse` are contiguous views of one buffer.
pub fn merge_partials(a: &AttentionPartial, b: &AttentionPartial) -> Result<AttentionPartial> {
    let dims = a.out.dims();
    let ok = dims.len() == 3
        && b.out.dims() == dims
        && a.lse.dims() == &dims[..2]
        && b.lse.dims() == &dims[..2]
        && [&a.out, &b.out, &a.lse, &b.lse].iter().all(|t| t.dtype() == DType::F32)
        && [&b.out, &a.lse, &b.lse]
            .iter()
            .all(|t| t.device().same_device(a.out.device()));
    if !ok {
        crate::invalid!(
            OP,
            "partials must be f32 out [T, Hq, D] and lse [T, Hq], equal in shape and on one device: \
             out {:?} {:?} vs {:?} {:?}, lse {:?} vs {:?}",
            a.out.dims(),
            a.out.dtype(),
            b.out.dims(),
            b.out.dtype(),
            a.lse.dims(),
            b.lse.dims()
        );
    }
    let (t, h, d) = (dims[0], dims[1], dims[2]);
    let op = MergePartials {
        lse_a: a.lse.contiguous()?,
        lse_b: b.lse.contiguous()?,
    };
    let flat = a.out.contiguous()?.apply_op2_no_bwd(&b.out.contiguous()?, &op)?;
    let rows = t * h;
    Ok(AttentionPartial {
        out: flat.narrow(0, 0, rows * d)?.reshape((t, h, d))?,
        lse: flat.narrow(0, rows * d, rows)?.reshape((t, h))?,
    })
}

/// `(out_a, out_b)` → flat `[T·Hq·D + T·Hq]` f32: the merged out, then the merged lse.
struct MergePartials {
    lse_a: Tensor,
    lse_b: Tensor,
}

fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{OP}: operands must be contiguous f32"),
    }
}

impl CustomOp2 for MergePartials {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (oa, ob) = (cpu_f32(a, al)?, cpu_f32(b, bl)?);
        let (sa, la_l) = self.lse_a.storage_and_layout();
        let (sb, lb_l) = self.lse_b.storage_and_layout();
        let (Storage::Cpu(sa), Storage::Cpu(sb)) = (&*sa, &*sb) else {
            candle_core::bail!("{OP}: the lse must be on the CPU with the outputs");
        };
        let (la, lb) = (cpu_f32(sa, la_l)?, cpu_f32(sb, lb_l)?);
        let (rows, d) = (la.len(), oa.len() / la.len().max(1));
        let mut y = vec![0f32; rows * (d + 1)];
        for r in 0..rows {
            let (wa, wb, lse) = weights(la[r], lb[r]);
            for j in 0..d {
                y[r * d + j] = oa[r * d + j] * wa + ob[r * d + j] * wb;
            }
            y[rows * d + r] = lse;
        }
        Ok((CpuStorage::F32(y), Shape::from_dims(&[rows * (d + 1)])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::attention::merge_partials(a, al, b, bl, &self.lse_a, &self.lse_b)
    }
}
