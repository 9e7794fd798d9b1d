//! RoPE tables written on the device from token positions ([`rope_tables_into`]), so
//! that a decode step uploads its positions and not its tables. The angles are computed
//! in f64 on both backends (`cpu_fwd`, the reference, and `rope_tables_*` in
//! `kernels/model_ops.cu`), rounded to f32, then to the table's dtype.

use crate::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor};

const OP: &str = "rope_tables_into";

/// The rotary frequencies `1 / theta^(2i / D)` for `i < D/2`, in f64.
pub fn rope_inv_freq(head_dim: usize, theta: f64) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
        .collect()
}

/// `cos(p · f_i)` and `sin(p · f_i)` for every position `p` of `positions` (rows) and
/// frequency `f_i` of [`rope_inv_freq`] (columns): two row-major `[n, D/2]` tables,
/// computed in f64 and rounded to f32. The CPU side of every RoPE table in the crate.
pub fn rope_cos_sin(positions: &[u32], head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let inv = rope_inv_freq(head_dim, theta);
    let mut cos = Vec::with_capacity(positions.len() * inv.len());
    let mut sin = Vec::with_capacity(positions.len() * inv.len());
    for &p in positions {
        for &f in &inv {
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

/// Writes the RoPE tables of `positions` `[B]` u32 into `tables` `[2, B, D/2]` in place
/// (row 0 the cosines, row 1 the sines: `cos(p · f_i)`, `sin(p · f_i)` with the
/// frequencies of [`rope_inv_freq`] for head dim `D` and base `theta`), on their device.
/// `tables` is f32, f16 or bf16 and contiguous; one kernel on CUDA.
pub fn rope_tables_into(tables: &Tensor, positions: &Tensor, theta: f64) -> Result<()> {
    let b = positions.dims1().unwrap_or(usize::MAX);
    let ok = tables.rank() == 3
        && tables.dims()[0] == 2
        && tables.dims()[1] == b
        && tables.dims()[2] > 0
        && positions.dtype() == DType::U32
        && matches!(tables.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && theta.is_finite()
        && theta > 0.0;
    if !ok {
        crate::invalid!(
            OP,
            "tables must be float [2, B, D/2] and positions u32 [B] with theta > 0: got tables {:?} {:?}, \
             positions {:?} {:?}, theta {theta}",
            tables.dims(),
            tables.dtype(),
            positions.dims(),
            positions.dtype()
        );
    }
    if !tables.device().same_device(positions.device()) {
        crate::invalid!(OP, "tables and positions must be on one device");
    }
    if !tables.is_contiguous() {
        crate::invalid!(OP, "tables must be contiguous, got strides {:?}", tables.stride());
    }
    if b == 0 {
        return Ok(());
    }
    tables.inplace_op2(&positions.contiguous()?, &RopeTables { theta })?;
    Ok(())
}

struct RopeTables {
    theta: f64,
}

impl InplaceOp2 for RopeTables {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, t: &mut CpuStorage, tl: &Layout, p: &CpuStorage, pl: &Layout) -> candle_core::Result<()> {
        let pos = super::util::u32_slice(OP, p, pl)?;
        let half = tl.dims()[2];
        // Row 0 the cosines, row 1 the sines.
        let (mut v, sin) = rope_cos_sin(pos, 2 * half, self.theta);
        v.extend(sin);
        let Some((a, _)) = tl.contiguous_offsets() else {
            candle_core::bail!("{OP}: tables must be contiguous");
        };
        let dt = t.dtype();
        match (t, super::util::float_storage(v, dt)) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => d[a..a + s.len()].copy_from_slice(&s),
            (CpuStorage::F16(d), CpuStorage::F16(s)) => d[a..a + s.len()].copy_from_slice(&s),
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => d[a..a + s.len()].copy_from_slice(&s),
            _ => candle_core::bail!("{OP}: tables must be f32, f16 or bf16"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        t: &mut candle_core::CudaStorage,
        tl: &Layout,
        p: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> candle_core::Result<()> {
        super::cuda::model_ops::rope_tables(t, tl, p, pl, self.theta)
    }
}
