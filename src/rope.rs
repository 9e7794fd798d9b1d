//! Rotary position embedding tables for arbitrary token positions (non-interleaved
//! "rotate half" convention of Hugging Face Llama/Qwen2 checkpoints).

use crate::Result;
use candle_core::{DType, Device, Tensor};

/// `cos`, `sin` tables `[positions.len(), head_dim / 2]` in `dtype` on `device`, for
/// rotary base `theta` (computed in f64).
pub fn rope_tables(
    positions: &[u32],
    head_dim: usize,
    theta: f64,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv: Vec<f64> = (0..half)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
        .collect();
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for &f in &inv {
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    let n = positions.len();
    let cos = Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Applies rotary embedding to `x` `[T, H, D]` with per-token tables `[T, D/2]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x4 = x.unsqueeze(0)?.contiguous()?;
    Ok(candle_nn::rotary_emb::rope_thd(&x4, cos, sin)?.squeeze(0)?)
}
