//! Quest page scoring: an upper bound of each page's attention score from its
//! element-wise key bounds, `Σᵢ max(qᵢ·maxᵢ, qᵢ·minᵢ)`, maxed over the query heads of
//! a GQA group.

use super::util::{self, Elem};
use super::{quest_q8, NONE};
use crate::Result;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

const OP: &str = "quest_page_scores";

struct QuestScores {
    candidates: Tensor,
    sink_pages: usize,
    window_pages: usize,
}

/// The CPU walk over candidate lists that both bound formats share: per `(b, KV head)`
/// row of `cand` (`[B·Hkv, n]`), the first `sink` and last `window` valid candidates
/// score +∞, `NONE` and what follows it -∞, and every other candidate
/// `page(slot, group)`, where `group` is the row's `[g, D]` query heads. Returns the
/// `[B·Hkv·n]` scores; a slot past `slots` is an error.
pub(super) fn score_lists<T: Elem>(
    q: &[T],
    cand: &[u32],
    (b, hq, hkv, n, d): (usize, usize, usize, usize, usize),
    (sink, window, slots): (usize, usize, usize),
    page: impl Fn(usize, &[T]) -> f32 + Sync,
) -> candle_core::Result<Vec<f32>> {
    let g = hq / hkv;
    let mut out = vec![f32::NEG_INFINITY; b * hkv * n];
    out.par_chunks_mut(n)
        .enumerate()
        .try_for_each(|(row, dst)| -> candle_core::Result<()> {
            let (bi, h) = (row / hkv, row % hkv);
            let group = &q[(bi * hq + h * g) * d..][..g * d];
            let list = &cand[row * n..(row + 1) * n];
            let valid = list.iter().position(|&c| c == NONE).unwrap_or(n);
            for (j, &slot) in list[..valid].iter().enumerate() {
                if j < sink || j + window >= valid {
                    dst[j] = f32::INFINITY;
                    continue;
                }
                let slot = slot as usize;
                if slot >= slots {
                    candle_core::bail!("{OP}: candidate slot {slot} out of range (metadata has {slots})");
                }
                dst[j] = page(slot, group);
            }
            Ok(())
        })?;
    Ok(out)
}

fn scores_cpu<T: Elem>(
    q: &[T],
    meta: &[T],
    cand: &[u32],
    dims: (usize, usize, usize, usize, usize),
    sink: usize,
    window: usize,
) -> candle_core::Result<Vec<f32>> {
    let d = dims.4;
    score_lists(q, cand, dims, (sink, window, meta.len() / (2 * d)), |slot, group| {
        let (mins, maxs) = meta[slot * 2 * d..(slot + 1) * 2 * d].split_at(d);
        group_max(group, d, |qx, x| (qx * maxs[x].to_f32()).max(qx * mins[x].to_f32()))
    })
}

/// The max over a GQA group's query heads (`group`: `d` values per head) of
/// `Σₓ term(qₓ, x)`, summed in `x` order: a page's Quest score in either bound format.
pub(crate) fn group_max<T: Elem>(group: &[T], d: usize, term: impl Fn(f32, usize) -> f32) -> f32 {
    let mut best = f32::NEG_INFINITY;
    for qv in group.chunks_exact(d) {
        let mut s = 0f32;
        for (x, q) in qv.iter().enumerate() {
            s += term(q.to_f32(), x);
        }
        best = best.max(s);
    }
    best
}

impl CustomOp2 for QuestScores {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        meta: &CpuStorage,
        ml: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, hq, d) = ql.shape().dims3()?;
        let (_, hkv, n) = self.candidates.dims3()?;
        let cand = util::u32_field(OP, &self.candidates)?;
        let (q0, q1) = util::contiguous_range(OP, ql)?;
        let (m0, m1) = util::contiguous_range(OP, ml)?;
        let dims = (b, hq, hkv, n, d);
        let (sink, window) = (self.sink_pages, self.window_pages);
        if let CpuStorage::U8(m) = meta {
            let m = &m[m0..m1];
            let out = match q {
                CpuStorage::F32(q) => quest_q8::scores_cpu(&q[q0..q1], m, &cand, dims, sink, window)?,
                CpuStorage::F16(q) => quest_q8::scores_cpu(&q[q0..q1], m, &cand, dims, sink, window)?,
                CpuStorage::BF16(q) => quest_q8::scores_cpu(&q[q0..q1], m, &cand, dims, sink, window)?,
                _ => candle_core::bail!("{OP}: q must be f32, f16 or bf16"),
            };
            return Ok((CpuStorage::F32(out), Shape::from_dims(&[b, hkv, n])));
        }
        let out = util::with_float_storages!(OP, (q, meta) => |q, m| scores_cpu(&q[q0..q1], &m[m0..m1], &cand, dims, self.sink_pages, self.window_pages)?);
        Ok((CpuStorage::F32(out), Shape::from_dims(&[b, hkv, n])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        meta: &candle_core::CudaStorage,
        ml: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::quest_score::quest_page_scores(
            q,
            ql,
            meta,
            ml,
            &self.candidates,
            self.sink_pages,
            self.window_pages,
        )
    }
}

/// Scores every candidate page of each (sequence, KV head) for Quest selection.
///
/// # Arguments
/// * `q` — `[B, Hq, D]` post-RoPE decode queries, one per sequence.
/// * `meta` — `[slots, 2, D]` page bounds (min, max), same dtype as `q`; or int8 bounds
///   `[slots, 2·D + 16]` u8 ([`quest_q8`]: the score is then
///   `2^e · Σᵢ max(qᵢ·maxᵢ, qᵢ·minᵢ)` over the stored integers, `2^e` the page's scale).
/// * `candidates` — `[B, Hkv, N]` u32 metadata slots in logical page order, padded at the
///   end with [`NONE`].
/// * `sink_pages`, `window_pages` — the first `sink_pages` and last `window_pages` valid
///   candidates of each row always win: they score `+inf`.
///
/// Returns `[B, Hkv, N]` f32 scores; padding scores `-inf`.
pub fn quest_page_scores(
    q: &Tensor,
    meta: &Tensor,
    candidates: &Tensor,
    sink_pages: usize,
    window_pages: usize,
) -> Result<Tensor> {
    util::check_shape(OP, "q", q, &[None, None, None], "[B, Hq, D]")?;
    let (b, hq, d) = q.dims3()?;
    util::check_nonzero(OP, "head dim D", d, ("q", q))?;
    util::check_nonzero(OP, "query heads Hq", hq, ("q", q))?;
    util::check_dtype(OP, "q", q, util::FLOAT_DTYPES)?;
    quest_q8::check_bounds(OP, meta, d, ("q", q))?;
    util::check_shape(
        OP,
        "candidates",
        candidates,
        &[Some(b), None, None],
        &format!("[{b}, Hkv, N]"),
    )?;
    util::check_dtype(OP, "candidates", candidates, &[DType::U32])?;
    let (_, hkv, n) = candidates.dims3()?;
    if hkv == 0 || hq % hkv != 0 {
        crate::invalid!(
            OP,
            "q has {hq} heads (shape {:?}), not a multiple of the {hkv} KV heads of candidates {:?}",
            q.dims(),
            candidates.dims()
        );
    }
    util::check_device(OP, meta.device(), &[("q", q), ("candidates", candidates)])?;
    util::check_contiguous(OP, &[("q", q), ("meta", meta), ("candidates", candidates)])?;
    if b == 0 || n == 0 {
        return Ok(Tensor::full(f32::NEG_INFINITY, (b, hkv, n), q.device())?);
    }
    let op = QuestScores {
        candidates: candidates.clone(),
        sink_pages,
        window_pages,
    };
    Ok(q.apply_op2_no_bwd(meta, &op)?)
}
