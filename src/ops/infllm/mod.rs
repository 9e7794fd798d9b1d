//! InfLLM's device state and the ops over it, so that its `index` and `select` are
//! device work only (padded decode steps and CUDA graphs can run them).
//!
//! **State.** Per (layer, owner) a *ring* of the latest `ring` tokens: their post-RoPE
//! keys `ring_k` `[S, ring, Hkv, D]` (cache dtype) and four u32 planes `ring_m`
//! `[S, 4, ring, Hkv]`: the host slot of each token's page, its attention mass (f32 bits),
//! the masses before the latest ring write (f32 bits, the *undo plane*), and in the first
//! word of the fourth plane the `start` of that write ([`NONE`](crate::ops::NONE) once restored): an
//! aborted step is rolled back by [`infllm_restore`] on the device, where the undo plane
//! is known to belong to the step.
//! Token `t` lives at ring entry `t % ring`. Per host slot, the representative keys
//! `repr` `[slots, kpp, D]`: a block's `r`-th representative key (of KV head `h`) lives in
//! the page slot of its `r / kpp`-th page (in head `h`), at index `r % kpp`, with
//! `kpp = ⌈repr / block_pages⌉`.
//!
//! **Runs.** Every op takes a `[R, 4]` u32 table of runs `(owner, start, n, row)`: the
//! sequence with owner index `owner` adds tokens `start..start + n`, at rows
//! `row..row + n` of the step's tensors. A run with `n = 0` is padding and is skipped.
//! A run's `n` must be at most `ring - window - block` ([`InfLlmGeometry::max_run`]).
//!
//! **Semantics** (those of `partition::InfLlm`): a key's mass is the softmax weight (over
//! the query's window of `window` keys ending at the query, per query head) that every
//! query whose window holds it gives it, summed over the query heads of its KV head. A
//! block of `block` tokens is finalized once no later window holds its last token: its
//! representatives are its `repr` keys of most mass (ties: the earlier token). After an
//! index call ending at token `E`, every block ending at or before `E + 1 - window` is
//! finalized.
//!
//! CPU functions are the reference; CUDA runs `kernels/infllm.cu`.

mod mass;
mod ring;
mod select;

pub use mass::{infllm_finalize, infllm_window_mass};
pub use ring::{infllm_mass_add, infllm_restore, infllm_ring_write};
pub use select::{infllm_block_scores, infllm_pages};

use super::util;
use crate::Result;
use candle_core::{CpuStorage, DType, Layout, Tensor};

/// Words per run of a runs table: owner, start, n, row.
pub const RUN_WORDS: usize = 4;

/// The sizes the ops share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfLlmGeometry {
    /// Keys a query's window holds (`window_tokens`).
    pub window: usize,
    /// Tokens per block (a multiple of `page_size`).
    pub block: usize,
    /// Representative keys per block and KV head.
    pub repr: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// Leading pages always attended.
    pub sink_pages: usize,
    /// Tokens the ring holds per (layer, owner).
    pub ring: usize,
}

impl InfLlmGeometry {
    /// Pages per block.
    pub fn block_pages(&self) -> usize {
        self.block / self.page_size.max(1)
    }

    /// Representative keys stored per page slot (`kpp`).
    pub fn keys_per_page(&self) -> usize {
        self.repr.div_ceil(self.block_pages().max(1))
    }

    /// Most pages past the finalized blocks (the pending tokens, always attended).
    pub fn pending_pages(&self) -> usize {
        (self.window + self.block - 1).div_ceil(self.page_size.max(1))
    }

    /// Most tokens one run may add in one call.
    pub fn max_run(&self) -> usize {
        self.ring.saturating_sub(self.window + self.block)
    }

    /// Blocks finalized once the token at `pos` is indexed (all of them eligible for the
    /// query at `pos`, past the sink).
    pub fn blocks_at(&self, pos: usize) -> usize {
        (pos + 1).saturating_sub(self.window) / self.block
    }

    fn check(&self, op: &'static str) -> Result<()> {
        let g = self;
        let ok = g.page_size > 0
            && g.window > 0
            && g.block > 0
            && g.block % g.page_size == 0
            && (1..=g.block).contains(&g.repr)
            && g.max_run() > 0
            && g.ring < u32::MAX as usize;
        if !ok {
            crate::invalid!(
                op,
                "geometry {g:?}: needs page_size, window and block >= 1, block a multiple of the page size, \
                 repr in 1..=block and ring > window + block"
            );
        }
        Ok(())
    }
}

fn check_runs(op: &'static str, runs: &Tensor, device: &candle_core::Device) -> Result<usize> {
    util::check_shape(
        op,
        "runs",
        runs,
        &[None, Some(RUN_WORDS)],
        "[R, 4] (owner, start, n, row)",
    )?;
    util::check_dtype(op, "runs", runs, &[DType::U32])?;
    util::check_device(op, device, &[("runs", runs)])?;
    util::check_contiguous(op, &[("runs", runs)])?;
    Ok(runs.dim(0)?)
}

/// `ring_k` `[S, ring, Hkv, D]` and `ring_m` `[S, 4, ring, Hkv]` u32; returns
/// `(S, ring, Hkv, D)`.
fn check_ring(op: &'static str, ring_k: &Tensor, ring_m: &Tensor) -> Result<(usize, usize, usize, usize)> {
    util::check_shape(op, "ring_k", ring_k, &[None, None, None, None], "[S, ring, Hkv, D]")?;
    util::check_dtype(op, "ring_k", ring_k, util::FLOAT_DTYPES)?;
    let (s, w, h, d) = ring_k.dims4()?;
    util::check_shape(
        op,
        "ring_m",
        ring_m,
        &[Some(s), Some(4), Some(w), Some(h)],
        &format!("[{s}, 4, {w}, {h}]"),
    )?;
    util::check_dtype(op, "ring_m", ring_m, &[DType::U32])?;
    util::check_device(op, ring_k.device(), &[("ring_m", ring_m)])?;
    util::check_contiguous(op, &[("ring_k", ring_k), ("ring_m", ring_m)])?;
    Ok((s, w, h, d))
}

/// The runs as `(owner, start, n, row)`, checked against `S` owners and `t` rows (CPU).
fn read_runs(op: &str, runs: &Tensor, owners: usize, rows: Option<usize>) -> candle_core::Result<Vec<[usize; 4]>> {
    let v = util::u32_field(op, runs)?;
    let out: Vec<[usize; 4]> = v
        .chunks_exact(RUN_WORDS)
        .map(|r| [r[0] as usize, r[1] as usize, r[2] as usize, r[3] as usize])
        .collect();
    for r in &out {
        if r[2] > 0 && (r[0] >= owners || rows.is_some_and(|t| r[3] + r[2] > t)) {
            candle_core::bail!("{op}: run {r:?} out of range ({owners} owners, {rows:?} rows)");
        }
    }
    Ok(out)
}

/// The u32 words of a contiguous `ring_m` CPU operand (one layer's planes).
fn ring_words<'a>(op: &str, m: &'a mut CpuStorage, ml: &Layout) -> candle_core::Result<&'a mut [u32]> {
    let (m0, m1) = util::contiguous_range(op, ml)?;
    match m {
        CpuStorage::U32(m) => Ok(&mut m[m0..m1]),
        _ => candle_core::bail!("{op}: ring_m must be u32"),
    }
}

/// Fails when a run holds more than `max_n` tokens (the bound the CUDA grids are sized by).
fn check_max_n(op: &str, runs: &[[usize; 4]], max_n: usize) -> candle_core::Result<()> {
    if let Some(r) = runs.iter().find(|r| r[2] > max_n) {
        candle_core::bail!("{op}: run {r:?} holds more than max_n = {max_n} tokens");
    }
    Ok(())
}

const WRITE: &str = "infllm_ring_write";
const MASS: &str = "infllm_window_mass";
const FINALIZE: &str = "infllm_finalize";
const SCORES: &str = "infllm_block_scores";
const PAGES: &str = "infllm_pages";
const MASS_ADD: &str = "infllm_mass_add";
const RESTORE: &str = "infllm_restore";
