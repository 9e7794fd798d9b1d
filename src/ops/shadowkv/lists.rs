//! [`shadowkv_lists`]: the always-attended pages of a decode step and the pairs of its
//! rebuilt chunks.

use super::{check_rows, read_rows, util, ShadowKvGeometry, LISTS};
use crate::ops::NONE;
use crate::Result;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

struct Lists {
    rows: Tensor,
    chunks: Tensor,
    outlier_ids: Tensor,
    n: usize,
    geo: ShadowKvGeometry,
    with_top: bool,
}

impl Lists {
    /// Entries per (row, KV head) of the selection.
    fn width(&self, n_out: usize, k: usize) -> usize {
        n_out + self.n + if self.with_top { k } else { 0 }
    }
}

impl CustomOp1 for Lists {
    fn name(&self) -> &'static str {
        LISTS
    }

    fn cpu_fwd(&self, top: &CpuStorage, tl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, k) = tl.shape().dims3()?;
        let n_out = self.outlier_ids.dim(2)?;
        let top = util::u32_slice(LISTS, top, tl)?;
        let oids = util::u32_field(LISTS, &self.outlier_ids)?;
        let chunks = util::u32_field(LISTS, &self.chunks)?;
        let rows = read_rows(LISTS, &self.rows, chunks.len())?;
        let w = self.width(n_out, k);
        let mut sel = vec![NONE; b * h * w];
        let mut pairs = vec![NONE; b * h * k * 2];
        for bh in 0..b * h {
            let (bi, hh) = (bh / h, bh % h);
            let [owner, pos, live] = rows[bi];
            let chunk = if live > 0 { chunks[owner] as usize } else { 0 };
            let (ef, np) = self.geo.exact_region(pos, live, chunk);
            let dst = &mut sel[bh * w..][..w];
            if live > 0 {
                for (j, o) in dst.iter_mut().take(n_out).enumerate() {
                    let id = oids[(owner * h + hh) * n_out + j];
                    if id != NONE && (id as usize) < ef {
                        *o = id;
                    }
                }
            }
            for (j, o) in dst[n_out..n_out + self.n].iter_mut().enumerate() {
                if j >= ef && j < np {
                    *o = j as u32;
                }
            }
            let chosen = &top[bh * k..][..k];
            if self.with_top {
                dst[n_out + self.n..].copy_from_slice(chosen);
            }
            for (j, &t) in chosen.iter().enumerate() {
                if t != NONE {
                    pairs[(bh * k + j) * 2] = (bh * k + j) as u32;
                    pairs[(bh * k + j) * 2 + 1] = t;
                }
            }
        }
        sel.extend(pairs);
        let len = sel.len();
        Ok((CpuStorage::U32(sel), Shape::from_dims(&[len])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        top: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let n_out = self.outlier_ids.dim(2)?;
        let w = self.width(n_out, tl.dims()[2]);
        crate::ops::cuda::shadowkv::lists(
            top,
            tl,
            (&self.rows, &self.chunks, &self.outlier_ids),
            self.n,
            w,
            &self.geo,
            self.with_top,
        )
    }
}

/// The pages each decoding row attends exactly, and the pairs of the chunks it rebuilds.
///
/// # Arguments
/// * `top` — `[B, Hkv, K]` u32 chosen chunks per row and KV head ([`NONE`]-padded; the
///   top-k of [`shadowkv_scores`](super::shadowkv_scores)).
/// * `rows` — `[B, 4]` u32 `(owner, position, n, row)`; `chunks` — `[M]` u32.
/// * `outlier_ids` — `[M, Hkv, n_out]` u32 outlier chunks of each owner and KV head,
///   [`NONE`]-padded.
/// * `n` — the page width `N` of the step's candidates.
/// * `with_top` — also name the chosen chunks in the selection (for host lists).
///
/// Returns:
/// * `sel` `[B, Hkv, n_out + N (+ K)]` u32: the outliers before the exact region (at
///   their index), the exact region's pages (page `j` at `n_out + j`), then `top` when
///   `with_top`; every other entry [`NONE`];
/// * `pairs` `[B, Hkv, K, 2]` u32: `(entry, chunk)` for each chosen chunk, where `entry =
///   (b·Hkv + h)·K + k` indexes the pool of [`shadowkv_rebuild`](super::shadowkv_rebuild),
///   `(NONE, NONE)` where `top` is [`NONE`].
pub fn shadowkv_lists(
    top: &Tensor,
    rows: &Tensor,
    chunks: &Tensor,
    outlier_ids: &Tensor,
    n: usize,
    geo: &ShadowKvGeometry,
    with_top: bool,
) -> Result<(Tensor, Tensor)> {
    geo.check(LISTS)?;
    util::check_shape(LISTS, "top", top, &[None, None, None], "[B, Hkv, K]")?;
    util::check_dtype(LISTS, "top", top, &[DType::U32])?;
    let (b, h, k) = top.dims3()?;
    check_rows(LISTS, b, rows, chunks, top)?;
    let m = chunks.dim(0)?;
    util::check_shape(
        LISTS,
        "outlier_ids",
        outlier_ids,
        &[Some(m), Some(h), None],
        &format!("[{m}, {h}, n_out]"),
    )?;
    util::check_dtype(LISTS, "outlier_ids", outlier_ids, &[DType::U32])?;
    util::check_device(LISTS, top.device(), &[("outlier_ids", outlier_ids)])?;
    util::check_contiguous(LISTS, &[("top", top), ("outlier_ids", outlier_ids)])?;
    let op = Lists {
        rows: rows.clone(),
        chunks: chunks.clone(),
        outlier_ids: outlier_ids.clone(),
        n,
        geo: *geo,
        with_top,
    };
    let w = op.width(outlier_ids.dim(2)?, k);
    let flat = top.apply_op1_no_bwd(&op)?;
    let sel = flat.narrow(0, 0, b * h * w)?.reshape((b, h, w))?;
    let pairs = flat.narrow(0, b * h * w, b * h * k * 2)?.reshape((b, h, k, 2))?;
    Ok((sel, pairs))
}
