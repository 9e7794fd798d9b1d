//! Plain reference attention from ordinary tensor ops, in f64: the yardstick of the tests.

use super::util;
use crate::Result;
use candle_core::{DType, Tensor, D};

const OP: &str = "reference_attention";

/// Causal attention of queries at positions `q_pos` over keys at positions `0..L`, from
/// plain tensor ops in f64 (GQA by repeating KV heads).
///
/// # Arguments
/// * `q` — `[T, Hq, D]`; `k`, `v` — `[L, Hkv, D]`; `Hq % Hkv == 0`.
/// * `q_pos` — `T` positions; query `t` sees keys `0..=q_pos[t]` (capped at `L`).
/// * `scale` — score scale.
///
/// Returns `[T, Hq, D]` f32.
pub fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, q_pos: &[usize], scale: f64) -> Result<Tensor> {
    util::check_shape(OP, "q", q, &[None, None, None], "[T, Hq, D]")?;
    let (t, hq, d) = q.dims3()?;
    util::check_shape(OP, "k", k, &[None, None, Some(d)], &format!("[L, Hkv, {d}]"))?;
    let (l, hkv, _) = k.dims3()?;
    util::check_shape(
        OP,
        "v",
        v,
        &[Some(l), Some(hkv), Some(d)],
        &format!("[{l}, {hkv}, {d}]"),
    )?;
    if hkv == 0 || hq % hkv != 0 || q_pos.len() != t {
        crate::invalid!(
            OP,
            "q {:?}, k {:?}, {} positions: need Hq % Hkv == 0 and one position per query",
            q.dims(),
            k.dims(),
            q_pos.len()
        );
    }
    let g = hq / hkv;
    let dev = q.device();
    let q = q.to_dtype(DType::F64)?.transpose(0, 1)?.contiguous()?; // [Hq, T, D]
    let rep = |x: &Tensor| -> Result<Tensor> {
        let x = x.to_dtype(DType::F64)?.transpose(0, 1)?; // [Hkv, L, D]
        Ok(x.unsqueeze(1)?
            .expand((hkv, g, l, d))?
            .reshape((hq, l, d))?
            .contiguous()?)
    };
    let (k, v) = (rep(k)?, rep(v)?);
    let scores = (q.matmul(&k.t()?)? * scale)?; // [Hq, T, L]
    let mut bias = vec![0f64; t * l];
    for (ti, &p) in q_pos.iter().enumerate() {
        for j in (p + 1).min(l)..l {
            bias[ti * l + j] = f64::NEG_INFINITY;
        }
    }
    let bias = Tensor::from_vec(bias, (1, t, l), dev)?;
    let scores = scores.broadcast_add(&bias)?;
    let m = scores.max_keepdim(D::Minus1)?;
    let p = scores.broadcast_sub(&m)?.exp()?;
    let p = p.broadcast_div(&p.sum_keepdim(D::Minus1)?)?;
    let out = p.matmul(&v)?; // [Hq, T, D]
    Ok(out.transpose(0, 1)?.to_dtype(DType::F32)?.contiguous()?)
}
