//! `Quest` (Tang et al., 2024): per page and KV head the element-wise min and max of the
//! post-RoPE keys; a page's score `Σᵢ max(qᵢ·maxᵢ, qᵢ·minᵢ)` bounds its best attention
//! logit; the top pages per KV head fill the token budget.

use super::{forced_pages, IndexInput, SelectInput, Selection, SparseAlgorithm};
use crate::ops::{quest_meta_update, quest_page_scores, topk_indices};
use crate::{CacheConfig, Error, Result};
use candle_core::Tensor;

/// Configuration of [`Quest`].
#[derive(Debug, Clone)]
pub struct QuestConfig {
    /// Tokens attended per decode step and KV head, sink and window included
    /// (`budget_tokens / page_size` pages). Default 1024.
    pub budget_tokens: usize,
    /// Leading tokens always attended (whole pages). Default 16.
    pub sink_tokens: usize,
    /// Most recent tokens always attended (whole pages; the newest page always). Default 32.
    pub window_tokens: usize,
    /// The first `dense_layers` layers attend densely (Quest's default: 2).
    pub dense_layers: usize,
    /// One selection shared by all KV heads (max of their scores) instead of one per head.
    pub shared_across_heads: bool,
}

impl Default for QuestConfig {
    fn default() -> Self {
        Self {
            budget_tokens: 1024,
            sink_tokens: 16,
            window_tokens: 32,
            dense_layers: 2,
            shared_across_heads: false,
        }
    }
}

/// Quest page selection. Metadata: `[host_pages, 2, D]` (min, max) in the KV dtype on
/// the fast tier's device — `1/page_size` of the KV bytes.
#[derive(Debug)]
pub struct Quest {
    cfg: QuestConfig,
    page_size: usize,
    meta: Option<Tensor>,
}

impl Quest {
    /// A Quest selector.
    pub fn new(cfg: QuestConfig) -> Self {
        Self {
            cfg,
            page_size: 0,
            meta: None,
        }
    }

    /// The metadata tensor `[host_pages, 2, D]` (after `init`).
    pub fn metadata(&self) -> Option<&Tensor> {
        self.meta.as_ref()
    }
}

impl SparseAlgorithm for Quest {
    fn name(&self) -> String {
        format!("quest(budget={})", self.cfg.budget_tokens)
    }

    fn init(&mut self, cfg: &CacheConfig) -> Result<()> {
        let (sink, window) = forced_pages(self.cfg.sink_tokens, self.cfg.window_tokens, cfg.page_size);
        let budget_pages = self.cfg.budget_tokens / cfg.page_size;
        if budget_pages < sink + window {
            return Err(Error::Config(format!(
                "quest: budget_tokens ({}) gives {budget_pages} pages of {}, fewer than sink ({sink}) + window ({window}) pages",
                self.cfg.budget_tokens, cfg.page_size
            )));
        }
        self.page_size = cfg.page_size;
        self.meta = Some(Tensor::zeros(
            (cfg.host_pages, 2, cfg.head_dim),
            cfg.dtype,
            &cfg.device,
        )?);
        Ok(())
    }

    fn page_minmax(&self) -> Option<&Tensor> {
        self.meta.as_ref()
    }

    /// The bounds are updated by the cache's fused append (on the cache's device) and
    /// the selection is scoring + top-k on the device.
    fn device_only_decode(&self) -> bool {
        true
    }

    fn index(&mut self, input: &IndexInput<'_>) -> Result<()> {
        if input.minmax_updated {
            return Ok(());
        }
        let meta = self
            .meta
            .as_ref()
            .ok_or_else(|| Error::Config("quest: used before init".into()))?;
        quest_meta_update(meta, input.k, input.dst, self.page_size)
    }

    fn select(&mut self, input: &SelectInput<'_>) -> Result<Selection> {
        if input.layer < self.cfg.dense_layers {
            return Ok(Selection::All);
        }
        let meta = self
            .meta
            .as_ref()
            .ok_or_else(|| Error::Config("quest: used before init".into()))?;
        let (sink, window) = forced_pages(self.cfg.sink_tokens, self.cfg.window_tokens, self.page_size);
        let k = self.cfg.budget_tokens / self.page_size;
        let scores = quest_page_scores(input.q, meta, input.candidates, sink, window)?; // [B, Hkv, N]
        let (b, hkv, n) = scores.dims3()?;
        let sel = if self.cfg.shared_across_heads {
            let shared = scores.max_keepdim(1)?.reshape((b, n))?;
            topk_indices(&shared, k)?
                .unsqueeze(1)?
                .expand((b, hkv, k))?
                .contiguous()?
        } else {
            topk_indices(&scores.reshape((b * hkv, n))?, k)?.reshape((b, hkv, k))?
        };
        Ok(Selection::Pages(sel))
    }
}
