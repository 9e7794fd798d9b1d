//! Causal attention of a step's new tokens over themselves, by dense matmuls (the
//! in-step part of a prefill; the part over earlier pages comes from the paged op).

use super::attention::AttentionPartial;
use super::util;
use crate::Result;
use candle_core::{DType, Tensor, D};

const OP: &str = "causal_self_attention";
/// Query rows per matmul chunk: bounds the `[Hq, chunk, n]` score buffer.
const CHUNK: usize = 512;

/// Causal attention of `n` consecutive tokens over themselves (token `i` sees `0..=i`).
///
/// # Arguments
/// * `q` — `[n, Hq, D]`, `k`/`v` — `[n, Hkv, D]`, one dtype (f32, f16, bf16); `Hq % Hkv == 0`.
/// * `scale` — score scale.
///
/// Returns the partial state (`out` `[n, Hq, D]` f32, `lse` `[n, Hq]` f32), computed in f32.
pub fn causal_self_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<AttentionPartial> {
    util::check_shape(OP, "q", q, &[None, None, None], "[n, Hq, D]")?;
    let (n, hq, d) = q.dims3()?;
    util::check_shape(OP, "k", k, &[Some(n), None, Some(d)], &format!("[{n}, Hkv, {d}]"))?;
    let hkv = k.dims()[1];
    util::check_shape(
        OP,
        "v",
        v,
        &[Some(n), Some(hkv), Some(d)],
        &format!("[{n}, {hkv}, {d}]"),
    )?;
    util::check_nonzero(OP, "head dim D", d, ("q", q))?;
    util::check_nonzero(OP, "query heads Hq", hq, ("q", q))?;
    util::check_dtype(OP, "q", q, util::FLOAT_DTYPES)?;
    util::check_same_dtype(OP, ("q", q), ("k", k))?;
    util::check_same_dtype(OP, ("q", q), ("v", v))?;
    util::check_device(OP, q.device(), &[("k", k), ("v", v)])?;
    if hkv == 0 || hq % hkv != 0 {
        crate::invalid!(
            OP,
            "q heads {hq} (shape {:?}) not a multiple of k heads {hkv} (shape {:?})",
            q.dims(),
            k.dims()
        );
    }
    let g = hq / hkv;
    let dev = q.device();
    // [Hkv, g, n, D] queries, [Hkv, n, D] keys/values, all f32.
    let qh = q
        .to_dtype(DType::F32)?
        .reshape((n, hkv, g, d))?
        .permute((1, 2, 0, 3))?
        .contiguous()?;
    let kh = k.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous()?;
    let vh = v.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous()?;
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        let keys = start + len; // rows start..start+len see keys 0..start+len
        let qc = qh.narrow(2, start, len)?.reshape((hkv, g * len, d))?;
        let kc = kh.narrow(1, 0, keys)?;
        let vc = vh.narrow(1, 0, keys)?;
        let scores = (qc.matmul(&kc.t()?)? * scale as f64)?.reshape((hkv, g, len, keys))?;
        let rows = Tensor::arange(start as u32, (start + len) as u32, dev)?.reshape((len, 1))?;
        let cols = Tensor::arange(0u32, keys as u32, dev)?.reshape((1, keys))?;
        let visible = cols.broadcast_le(&rows)?; // [len, keys]
        let neg = Tensor::full(f32::NEG_INFINITY, (len, keys), dev)?;
        let zeros = Tensor::zeros((len, keys), DType::F32, dev)?;
        let bias = visible.where_cond(&zeros, &neg)?;
        let scores = scores.broadcast_add(&bias)?;
        let m = scores.max_keepdim(D::Minus1)?;
        let p = scores.broadcast_sub(&m)?.exp()?;
        let l = p.sum_keepdim(D::Minus1)?;
        let lse = (m + l.log()?)?; // [Hkv, g, len, 1]
        let p = p.broadcast_div(&l)?.reshape((hkv, g * len, keys))?;
        let o = p.matmul(&vc)?.reshape((hkv, g, len, d))?;
        outs.push(o);
        lses.push(lse.squeeze(3)?);
        start += len;
    }
    let out = Tensor::cat(&outs, 2)?; // [Hkv, g, n, D]
    let lse = Tensor::cat(&lses, 2)?; // [Hkv, g, n]
    let out = out.permute((2, 0, 1, 3))?.reshape((n, hq, d))?.contiguous()?;
    let lse = lse.permute((2, 0, 1))?.reshape((n, hq))?.contiguous()?;
    Ok(AttentionPartial { out, lse })
}
