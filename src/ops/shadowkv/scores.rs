//! [`shadowkv_scores`]: the landmark scores of a decode step's compressed chunks.

use super::{check_rows, read_rows, util, ShadowKvGeometry, SCORES};
use crate::ops::NONE;
use crate::Result;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

struct Scores {
    outlier: Tensor,
    candidates: Tensor,
    rows: Tensor,
    chunks: Tensor,
    geo: ShadowKvGeometry,
    scale: f32,
}

impl CustomOp2 for Scores {
    fn name(&self) -> &'static str {
        SCORES
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        lm: &CpuStorage,
        ll: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, hq, d) = ql.shape().dims3()?;
        let slots = ll.dims()[0];
        let (_, h, n) = self.candidates.dims3()?;
        let g = hq / h;
        let qv = util::float_values(SCORES, q, ql)?;
        let lv = util::float_values(SCORES, lm, ll)?;
        let flags = util::float_field(SCORES, "outlier", &self.outlier)?;
        let cand = util::u32_field(SCORES, &self.candidates)?;
        let chunks = util::u32_field(SCORES, &self.chunks)?;
        let rows = read_rows(SCORES, &self.rows, chunks.len())?;
        let mut out = vec![f32::NEG_INFINITY; b * h * n];
        out.par_chunks_mut(n.max(1))
            .enumerate()
            .try_for_each(|(bh, dst)| -> candle_core::Result<()> {
                let (bi, hh) = (bh / h, bh % h);
                let [owner, pos, live] = rows[bi];
                let chunk = if live > 0 { chunks[owner] as usize } else { 0 };
                let nc = chunk.min(n);
                let ef = self.geo.exact_region(pos, live, chunk).0.min(nc);
                if ef == 0 {
                    return Ok(());
                }
                let cand = &cand[bh * n..][..n];
                // A `NONE` candidate reads as a zero landmark and no outlier flag.
                let row = |j: usize| -> candle_core::Result<Option<usize>> {
                    match cand[j] {
                        NONE => Ok(None),
                        s if (s as usize) < slots => Ok(Some(s as usize)),
                        s => candle_core::bail!("{SCORES}: candidate slot {s} out of range ({slots} slots)"),
                    }
                };
                let mut logits = vec![0f32; g * nc];
                for j in 0..nc {
                    if let Some(s) = row(j)? {
                        let key = &lv[s * d..][..d];
                        for gi in 0..g {
                            let qr = &qv[(bi * hq + hh * g + gi) * d..][..d];
                            logits[gi * nc + j] = key.iter().zip(qr).map(|(x, y)| x * y).sum::<f32>() * self.scale;
                        }
                    }
                }
                let stats: Vec<(f32, f32)> = (0..g)
                    .map(|gi| {
                        let l = &logits[gi * nc..][..nc];
                        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        (m, l.iter().map(|x| (x - m).exp()).sum::<f32>())
                    })
                    .collect();
                for (j, o) in dst.iter_mut().enumerate().take(ef) {
                    let best = (0..g)
                        .map(|gi| (logits[gi * nc + j] - stats[gi].0).exp() / stats[gi].1)
                        .fold(f32::NEG_INFINITY, f32::max);
                    *o = best + row(j)?.map_or(0.0, |s| flags[s]);
                }
                Ok(())
            })?;
        Ok((CpuStorage::F32(out), Shape::from_dims(&[b, h, n])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        lm: &candle_core::CudaStorage,
        ll: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::shadowkv::scores(
            q,
            ql,
            lm,
            ll,
            (&self.outlier, &self.candidates, &self.rows, &self.chunks),
            &self.geo,
            self.scale,
        )
    }
}

/// The landmark score of each decoding row's chunks, per KV head: for each query head of
/// the group, a softmax (scaled by `scale`) of `q · landmark` over the row's compressed
/// chunks; the max of those over the group; plus the chunk's outlier flag (`-inf` at
/// outliers). Chunks at or past the exact region's start (`ef`, see the module docs), and
/// every chunk of a padding row, score `-inf`.
///
/// # Arguments
/// * `q` — `[B, Hq, D]` post-RoPE decode queries (f32, f16 or bf16).
/// * `lm` — `[S, D]` f32 landmark of each host page slot; `outlier` — `[S, 1]` f32 flags.
/// * `candidates` — `[B, Hkv, N]` u32 host slots of each row's pages in logical order
///   ([`NONE`]-padded; a `NONE` chunk reads as a zero landmark).
/// * `rows` — `[B, 4]` u32 `(owner, position, n, row)`; `chunks` — `[M]` u32 compressed
///   chunks of each owner (one layer's).
///
/// Returns `[B, Hkv, N]` f32.
#[allow(clippy::too_many_arguments)]
pub fn shadowkv_scores(
    q: &Tensor,
    lm: &Tensor,
    outlier: &Tensor,
    candidates: &Tensor,
    rows: &Tensor,
    chunks: &Tensor,
    geo: &ShadowKvGeometry,
    scale: f32,
) -> Result<Tensor> {
    geo.check(SCORES)?;
    util::check_shape(SCORES, "q", q, &[None, None, None], "[B, Hq, D]")?;
    util::check_dtype(SCORES, "q", q, util::FLOAT_DTYPES)?;
    let (b, hq, d) = q.dims3()?;
    util::check_shape(SCORES, "lm", lm, &[None, Some(d)], &format!("[S, {d}]"))?;
    let s = lm.dim(0)?;
    util::check_shape(SCORES, "outlier", outlier, &[Some(s), Some(1)], &format!("[{s}, 1]"))?;
    for (name, t) in [("lm", lm), ("outlier", outlier)] {
        util::check_dtype(SCORES, name, t, &[DType::F32])?;
    }
    util::check_shape(
        SCORES,
        "candidates",
        candidates,
        &[Some(b), None, None],
        &format!("[{b}, Hkv, N]"),
    )?;
    util::check_dtype(SCORES, "candidates", candidates, &[DType::U32])?;
    let h = candidates.dim(1)?;
    if h == 0 || hq % h != 0 || hq / h > crate::ops::kernel_consts::SHADOWKV_MAX_GROUP {
        crate::invalid!(
            SCORES,
            "q {:?} has {hq} heads, not a multiple of the {h} KV heads of candidates {:?} by at most {}",
            q.dims(),
            candidates.dims(),
            crate::ops::kernel_consts::SHADOWKV_MAX_GROUP
        );
    }
    check_rows(SCORES, b, rows, chunks, q)?;
    util::check_device(
        SCORES,
        q.device(),
        &[("lm", lm), ("outlier", outlier), ("candidates", candidates)],
    )?;
    util::check_contiguous(
        SCORES,
        &[("q", q), ("lm", lm), ("outlier", outlier), ("candidates", candidates)],
    )?;
    let op = Scores {
        outlier: outlier.clone(),
        candidates: candidates.clone(),
        rows: rows.clone(),
        chunks: chunks.clone(),
        geo: *geo,
        scale,
    };
    Ok(q.apply_op2_no_bwd(lm, &op)?)
}
