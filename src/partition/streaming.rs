//! `Streaming` (StreamingLLM-style): attention sinks plus a local window, nothing else.

use super::{forced_pages, SelectInput, Selection, SparseAlgorithm};
use crate::ops::NONE;
use crate::{CacheConfig, Error, Result};
use candle_core::{DType, Tensor};

/// Configuration of [`Streaming`].
#[derive(Debug, Clone)]
pub struct StreamingConfig {
    /// Leading tokens always attended (rounded up to whole pages). Default 64.
    pub sink_tokens: usize,
    /// Most recent tokens always attended (rounded up to whole pages). Default 1024.
    pub window_tokens: usize,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        Self {
            sink_tokens: 64,
            window_tokens: 1024,
        }
    }
}

/// Sink + window attention.
#[derive(Debug, Clone)]
pub struct Streaming {
    cfg: StreamingConfig,
    /// `[1, 1, sink + window]` f32 on the cache device: each list position, and 1 where
    /// it is past the sink (built at `init`, so that a step uploads nothing).
    positions: Option<(Tensor, Tensor)>,
}

impl Streaming {
    /// A streaming selector.
    pub fn new(cfg: StreamingConfig) -> Self {
        Self { cfg, positions: None }
    }
}

impl SparseAlgorithm for Streaming {
    fn name(&self) -> String {
        format!(
            "streaming(sink={}, window={})",
            self.cfg.sink_tokens, self.cfg.window_tokens
        )
    }

    fn init(&mut self, cfg: &CacheConfig) -> Result<()> {
        if self.cfg.window_tokens == 0 {
            return Err(Error::Config("streaming: window_tokens must be >= 1".into()));
        }
        let (sink, window) = forced_pages(self.cfg.sink_tokens, self.cfg.window_tokens, cfg.page_size);
        let k = sink + window;
        let pos: Vec<f32> = (0..k).map(|j| j as f32).collect();
        let past: Vec<f32> = (0..k).map(|j| (j >= sink) as u8 as f32).collect();
        self.positions = Some((
            Tensor::from_vec(pos, (1, 1, k), &cfg.device)?,
            Tensor::from_vec(past, (1, 1, k), &cfg.device)?,
        ));
        Ok(())
    }

    /// The sink and window pages, computed on the device from the candidates (each row's
    /// page count is its number of non-[`NONE`] candidates), so that padded decode steps
    /// and CUDA graphs can run it.
    fn device_only_decode(&self) -> bool {
        true
    }

    /// `[B, Hkv, sink + window]` logical pages, ascending, padded with [`NONE`]: page `k`
    /// of the list is `k` in the sink part and `n - (sink + window) + k` in the window
    /// part once a row's `n` pages exceed the list (before that, `k` while `k < n`).
    fn select(&mut self, input: &SelectInput<'_>) -> Result<Selection> {
        let (pos, past_sink) = self
            .positions
            .as_ref()
            .ok_or_else(|| Error::Config("streaming: used before init".into()))?;
        let k = pos.dim(2)?;
        let (b, hkv, n_max) = input.candidates.dims3()?;
        let dev = input.candidates.device();
        // Page counts and list positions in f32 (exact below 2^24 pages); every constant
        // is a device fill or was uploaded at init.
        // [B, Hkv, 1]
        let n = input
            .candidates
            .ne(&Tensor::full(NONE, (b, hkv, n_max), dev)?)?
            .to_dtype(DType::F32)?
            .sum_keepdim(2)?;
        // Past the sink, positions shift by max(n - k, 0).
        let shift = n.affine(1.0, -(k as f64))?.relu()?.broadcast_mul(past_sink)?; // [B, Hkv, K]
        let page = shift.broadcast_add(pos)?;
        let valid = page.broadcast_lt(&n)?;
        let none = Tensor::full(NONE, (b, hkv, k), dev)?;
        Ok(Selection::Pages(valid.where_cond(&page.to_dtype(DType::U32)?, &none)?))
    }
}
