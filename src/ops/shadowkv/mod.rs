//! ShadowKV's decode-time device ops (its device mode, `partition/shadowkv/device.rs`),
//! each one fused kernel on CUDA where the composed candle version launched dozens:
//!
//! - [`shadowkv_scores`]: the landmark score of every compressed chunk (per query head a
//!   softmax over the chunks, the max over the GQA group, outliers and the exact region
//!   masked), ready for [`topk_indices`](crate::ops::topk_indices);
//! - [`shadowkv_lists`]: the always-attended pages (outliers before the exact region, the
//!   exact region) and the `(index, page)` pairs of the chosen chunks;
//! - [`shadowkv_rebuild`]: the chosen chunks' keys rebuilt from the low-rank factor
//!   (left rows × right factor, RoPE at their positions; tensor cores on CUDA), beside
//!   their values copied from the fast tier, as a step-local page pool.
//!
//! **Rows.** Every op takes the decode rows as the `[B, 4]` u32 runs table `(owner,
//! position, n, row)` of [`SelectInput::rows`](crate::partition::SelectInput): the row's
//! sequence holds `position + 1` tokens; `n = 0` marks a padding row, which selects and
//! rebuilds nothing. With `chunks[owner]` compressed chunks, the *exact region* starts at
//! chunk `ef = min(⌊max(position + 1 − window, 0) / P⌋, chunks[owner])` and ends before
//! page `⌈(position + 1) / P⌉`; only chunks before `ef` are scored.
//!
//! CPU functions are the reference; CUDA runs `kernels/shadowkv.cu`. The CUDA kernels
//! skip out-of-range slots, owners and pages (they read as zero rows) where the CPU
//! reference fails with an error.

mod lists;
pub(crate) mod rebuild;
mod scores;

pub use lists::shadowkv_lists;
pub use rebuild::shadowkv_rebuild;
pub use scores::shadowkv_scores;

use super::util;
use crate::Result;
use candle_core::{DType, Tensor};

/// The sizes the ops share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowKvGeometry {
    /// Tokens per page (= per chunk).
    pub page_size: usize,
    /// Most recent tokens always attended exactly.
    pub window: usize,
}

impl ShadowKvGeometry {
    /// The exact region of a row `(position, n)` with `chunks` compressed chunks:
    /// `(ef, np)`, its first chunk and the row's page count (both 0 for padding rows).
    pub fn exact_region(&self, position: usize, n: usize, chunks: usize) -> (usize, usize) {
        if n == 0 || self.page_size == 0 {
            return (0, 0);
        }
        let nt = position + 1;
        let ef = (nt.saturating_sub(self.window) / self.page_size).min(chunks);
        (ef, nt.div_ceil(self.page_size))
    }

    fn check(&self, op: &'static str) -> Result<()> {
        if self.page_size == 0 {
            crate::invalid!(op, "page_size must be positive, got {self:?}");
        }
        Ok(())
    }
}

/// The decode rows `[B, 4]` (`(owner, position, n, row)`) as `(owner, position, n)`,
/// checked against `owners` for live rows (CPU).
fn read_rows(op: &str, rows: &Tensor, owners: usize) -> candle_core::Result<Vec<[usize; 3]>> {
    let v = util::u32_field(op, rows)?;
    let out: Vec<[usize; 3]> = v
        .chunks_exact(4)
        .map(|r| [r[0] as usize, r[1] as usize, r[2] as usize])
        .collect();
    if let Some(r) = out.iter().find(|r| r[2] > 0 && r[0] >= owners) {
        candle_core::bail!("{op}: row {r:?} names owner {} of {owners}", r[0]);
    }
    Ok(out)
}

/// Checks the shared row inputs: `rows` `[B, 4]` u32, `chunks` `[M]` u32, both
/// contiguous on `dev`'s device.
fn check_rows(op: &'static str, b: usize, rows: &Tensor, chunks: &Tensor, dev: &Tensor) -> Result<()> {
    util::check_shape(op, "rows", rows, &[Some(b), Some(4)], &format!("[{b}, 4]"))?;
    util::check_shape(op, "chunks", chunks, &[None], "[M]")?;
    for (name, t) in [("rows", rows), ("chunks", chunks)] {
        util::check_dtype(op, name, t, &[DType::U32])?;
    }
    util::check_device(op, dev.device(), &[("rows", rows), ("chunks", chunks)])?;
    util::check_contiguous(op, &[("rows", rows), ("chunks", chunks)])?;
    Ok(())
}

const SCORES: &str = "shadowkv_scores";
const LISTS: &str = "shadowkv_lists";
const REBUILD: &str = "shadowkv_rebuild";
