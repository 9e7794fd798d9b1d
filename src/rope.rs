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
    let (cos, sin) = crate::ops::rope_cos_sin(positions, head_dim, theta);
    let n = positions.len();
    // Rounded to `dtype` on the host (round to nearest even, as candle's casts do), so
    // that each table is one upload and no cast kernel.
    let table = |v: Vec<f32>| -> Result<Tensor> {
        Ok(match dtype {
            DType::BF16 => Tensor::from_vec(
                v.into_iter().map(half::bf16::from_f32).collect::<Vec<_>>(),
                (n, half),
                device,
            )?,
            DType::F16 => Tensor::from_vec(
                v.into_iter().map(half::f16::from_f32).collect::<Vec<_>>(),
                (n, half),
                device,
            )?,
            _ => Tensor::from_vec(v, (n, half), device)?.to_dtype(dtype)?,
        })
    };
    Ok((table(cos)?, table(sin)?))
}

/// Applies rotary embedding to `x` `[T, H, D]` with per-token tables `[T, D/2]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x4 = x.unsqueeze(0)?.contiguous()?;
    Ok(candle_nn::rotary_emb::rope_thd(&x4, cos, sin)?.squeeze(0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The half-precision tables are the f32 tables cast by candle, bit for bit.
    #[test]
    fn half_tables_equal_the_cast_f32_tables() {
        let positions: Vec<u32> = vec![0, 1, 7, 255, 4096, 131_071];
        let (c32, s32) = rope_tables(&positions, 64, 10_000.0, DType::F32, &Device::Cpu).unwrap();
        for dt in [DType::BF16, DType::F16] {
            let (c, s) = rope_tables(&positions, 64, 10_000.0, dt, &Device::Cpu).unwrap();
            for (got, f) in [(c, &c32), (s, &s32)] {
                let want = f.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap();
                let got = got.to_dtype(DType::F32).unwrap();
                let (g, w) = (
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                assert_eq!(g.len(), positions.len() * 32);
                assert!(g.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()), "{dt:?}");
            }
        }
    }
}
