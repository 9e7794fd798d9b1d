//! `Streaming` (StreamingLLM-style): attention sinks plus a local window, nothing else.

use super::{forced_pages, SelectInput, Selection, SparseAlgorithm};
use crate::ops::NONE;
use crate::{CacheConfig, Error, Result};
use candle_core::Tensor;

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
    page_size: usize,
    kv_heads: usize,
}

impl Streaming {
    /// A streaming selector.
    pub fn new(cfg: StreamingConfig) -> Self {
        Self {
            cfg,
            page_size: 0,
            kv_heads: 0,
        }
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
        self.page_size = cfg.page_size;
        self.kv_heads = cfg.num_kv_heads;
        Ok(())
    }

    fn select(&mut self, input: &SelectInput<'_>) -> Result<Selection> {
        let (sink, window) = forced_pages(self.cfg.sink_tokens, self.cfg.window_tokens, self.page_size);
        let k = sink + window;
        let b = input.num_pages.len();
        let mut sel = vec![NONE; b * self.kv_heads * k];
        for (bi, &n) in input.num_pages.iter().enumerate() {
            let pages: Vec<u32> = (0..n)
                .filter(|&j| j < sink || j + window >= n)
                .map(|j| j as u32)
                .collect();
            for h in 0..self.kv_heads {
                let row = &mut sel[(bi * self.kv_heads + h) * k..][..k];
                row[..pages.len()].copy_from_slice(&pages);
            }
        }
        Ok(Selection::Pages(Tensor::from_vec(
            sel,
            (b, self.kv_heads, k),
            input.q.device(),
        )?))
    }
}
