//! Selection from the representative keys: block scores ([`infllm_block_scores`]) and
//! the page lists of the chosen blocks ([`infllm_pages`]).

use super::{check_runs, read_runs, util, InfLlmGeometry, PAGES, SCORES};
use crate::ops::NONE;
use crate::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

struct BlockScores {
    candidates: Tensor,
    rows: Tensor,
    geo: InfLlmGeometry,
}

impl CustomOp2 for BlockScores {
    fn name(&self) -> &'static str {
        SCORES
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        rep: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, hq, d) = ql.shape().dims3()?;
        let (slots, kpp, _) = pl.shape().dims3()?;
        let (_, h, n) = self.candidates.dims3()?;
        let geo = self.geo;
        let bp = geo.block_pages();
        let nb = n.div_ceil(bp);
        let g = hq / h;
        let cand = util::u32_field(SCORES, &self.candidates)?;
        let rows = read_runs(SCORES, &self.rows, usize::MAX, None)?;
        let qv = util::float_values(SCORES, q, ql)?;
        let rv = util::float_values(SCORES, rep, pl)?;
        let mut out = vec![f32::NEG_INFINITY; b * nb];
        out.par_chunks_mut(nb.max(1))
            .enumerate()
            .try_for_each(|(bi, dst)| -> candle_core::Result<()> {
                let [_, pos, live, _] = rows[bi];
                if live == 0 {
                    return Ok(());
                }
                let qsum: Vec<f32> = (0..h * d)
                    .map(|i| (0..g).map(|gi| qv[(bi * hq + (i / d) * g + gi) * d + i % d]).sum())
                    .collect();
                for (j, o) in dst.iter_mut().enumerate().take(geo.blocks_at(pos)) {
                    if (j + 1) * bp <= geo.sink_pages {
                        continue;
                    }
                    let mut total = 0f32;
                    let mut ok = true;
                    for hh in 0..h {
                        for r in 0..geo.repr {
                            let page = j * bp + r / kpp;
                            let slot = if page < n { cand[(bi * h + hh) * n + page] } else { NONE };
                            if slot == NONE {
                                ok = false;
                                continue;
                            }
                            if slot as usize >= slots {
                                candle_core::bail!("{SCORES}: candidate slot {slot} out of range ({slots} slots)");
                            }
                            let key = &rv[(slot as usize * kpp + r % kpp) * d..][..d];
                            total += key
                                .iter()
                                .zip(&qsum[hh * d..(hh + 1) * d])
                                .map(|(x, y)| x * y)
                                .sum::<f32>();
                        }
                    }
                    if ok {
                        *o = total / geo.repr as f32;
                    }
                }
                Ok(())
            })?;
        Ok((CpuStorage::F32(out), Shape::from_dims(&[b, nb])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        rep: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::infllm::block_scores(q, ql, rep, pl, &self.candidates, &self.rows, &self.geo)
    }
}

/// Scores each block of each decoding sequence: the mean over its representatives of
/// their dot products with the query, summed over all query heads. Blocks not yet
/// finalized at the row's position, blocks inside the sink, and padding rows (`n = 0`)
/// score `-inf`.
///
/// # Arguments
/// * `q` — `[B, Hq, D]` post-RoPE decode queries; `repr` — `[slots, kpp, D]`, q's dtype.
/// * `candidates` — `[B, Hkv, N]` u32 host slots of each row's pages in logical order.
/// * `rows` — `[B, 4]` u32 runs of the decode tokens: `(owner, position, n, row)`.
///
/// Returns `[B, ⌈N / block_pages⌉]` f32.
pub fn infllm_block_scores(
    q: &Tensor,
    repr: &Tensor,
    candidates: &Tensor,
    rows: &Tensor,
    geo: &InfLlmGeometry,
) -> Result<Tensor> {
    geo.check(SCORES)?;
    util::check_shape(SCORES, "q", q, &[None, None, None], "[B, Hq, D]")?;
    let (b, hq, d) = q.dims3()?;
    let kpp = geo.keys_per_page();
    util::check_shape(
        SCORES,
        "repr",
        repr,
        &[None, Some(kpp), Some(d)],
        &format!("[slots, {kpp}, {d}]"),
    )?;
    util::check_same_dtype(SCORES, ("q", q), ("repr", repr))?;
    util::check_dtype(SCORES, "q", q, util::FLOAT_DTYPES)?;
    util::check_shape(
        SCORES,
        "candidates",
        candidates,
        &[Some(b), None, None],
        &format!("[{b}, Hkv, N]"),
    )?;
    util::check_dtype(SCORES, "candidates", candidates, &[DType::U32])?;
    let (_, h, n) = candidates.dims3()?;
    if h == 0 || hq % h != 0 {
        crate::invalid!(
            SCORES,
            "q {:?} has {hq} heads, not a multiple of the {h} KV heads of candidates {:?}",
            q.dims(),
            candidates.dims()
        );
    }
    if check_runs(SCORES, rows, q.device())? != b {
        crate::invalid!(
            SCORES,
            "rows {:?} must hold one run per query row of q {:?}",
            rows.dims(),
            q.dims()
        );
    }
    util::check_device(SCORES, q.device(), &[("repr", repr), ("candidates", candidates)])?;
    util::check_contiguous(SCORES, &[("q", q), ("repr", repr), ("candidates", candidates)])?;
    let nb = n.div_ceil(geo.block_pages());
    if b == 0 || nb == 0 {
        return Ok(Tensor::full(f32::NEG_INFINITY, (b, nb), q.device())?);
    }
    let op = BlockScores {
        candidates: candidates.clone(),
        rows: rows.clone(),
        geo: *geo,
    };
    Ok(q.apply_op2_no_bwd(repr, &op)?)
}

struct Pages {
    rows: Tensor,
    geo: InfLlmGeometry,
    hkv: usize,
}

impl Pages {
    fn width(&self, k: usize) -> usize {
        self.geo.sink_pages + k * self.geo.block_pages() + self.geo.pending_pages()
    }
}

/// One row's pages (module docs of `partition::infllm`): the sink, the chosen blocks
/// (ascending), the pending pages; `top` are block ids, `NONE` padded.
pub(crate) fn row_pages(geo: &InfLlmGeometry, pos: usize, top: &[u32]) -> Vec<u32> {
    let (p, bp) = (geo.page_size, geo.block_pages());
    let np = (pos + 1).div_ceil(p);
    let blocks = geo.blocks_at(pos);
    let forced = blocks * bp;
    let mut ids: Vec<usize> = top
        .iter()
        .filter(|&&j| j != NONE)
        .map(|&j| j as usize)
        .filter(|&j| j < blocks)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut out: Vec<u32> = (0..geo.sink_pages.min(np) as u32).collect();
    for j in ids {
        out.extend(
            (j * bp..(j + 1) * bp)
                .filter(|&x| x >= geo.sink_pages && x < forced.min(np))
                .map(|x| x as u32),
        );
    }
    out.extend((forced.max(geo.sink_pages)..np).map(|x| x as u32));
    out
}

impl CustomOp1 for Pages {
    fn name(&self) -> &'static str {
        PAGES
    }

    fn cpu_fwd(&self, t: &CpuStorage, tl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, k) = tl.shape().dims2()?;
        let top = util::u32_slice(PAGES, t, tl)?;
        let rows = read_runs(PAGES, &self.rows, usize::MAX, None)?;
        let width = self.width(k);
        let mut out = vec![NONE; b * self.hkv * width];
        for (bi, chunk) in out.chunks_mut(self.hkv * width).enumerate() {
            let [_, pos, live, _] = rows[bi];
            if live == 0 {
                continue;
            }
            let pages = row_pages(&self.geo, pos, &top[bi * k..(bi + 1) * k]);
            if pages.len() > width {
                candle_core::bail!(
                    "{PAGES}: row {bi} needs {} pages, more than {width} (internal error)",
                    pages.len()
                );
            }
            for row in chunk.chunks_mut(width) {
                row[..pages.len()].copy_from_slice(&pages);
            }
        }
        Ok((CpuStorage::U32(out), Shape::from_dims(&[b, self.hkv, width])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        t: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (_, k) = tl.shape().dims2()?;
        crate::ops::cuda::infllm::pages(t, tl, &self.rows, &self.geo, self.hkv, self.width(k))
    }
}

/// The logical pages each decoding row attends: its sink pages, the pages of its chosen
/// blocks and its pending pages (past the finalized blocks), ascending, the same list for
/// every KV head; padding rows (`n = 0`) get none.
///
/// # Arguments
/// * `top` — `[B, k]` u32 chosen block ids ([`topk_indices`](crate::ops::topk_indices) of
///   [`infllm_block_scores`]), `NONE` padded.
/// * `rows` — `[B, 4]` u32 runs of the decode tokens.
///
/// Returns `[B, hkv, sink_pages + k · block_pages + pending_pages]` u32, `NONE` padded.
pub fn infllm_pages(top: &Tensor, rows: &Tensor, geo: &InfLlmGeometry, hkv: usize) -> Result<Tensor> {
    geo.check(PAGES)?;
    util::check_shape(PAGES, "top", top, &[None, None], "[B, k]")?;
    util::check_dtype(PAGES, "top", top, &[DType::U32])?;
    util::check_contiguous(PAGES, &[("top", top)])?;
    let (b, k) = top.dims2()?;
    if check_runs(PAGES, rows, top.device())? != b {
        crate::invalid!(
            PAGES,
            "rows {:?} must hold one run per row of top {:?}",
            rows.dims(),
            top.dims()
        );
    }
    if hkv == 0 || k == 0 {
        crate::invalid!(PAGES, "hkv ({hkv}) and k (top {:?}) must be >= 1", top.dims());
    }
    let op = Pages {
        rows: rows.clone(),
        geo: *geo,
        hkv,
    };
    if b == 0 {
        return Ok(Tensor::full(NONE, (0, hkv, op.width(k)), top.device())?);
    }
    Ok(top.apply_op1_no_bwd(&op)?)
}
