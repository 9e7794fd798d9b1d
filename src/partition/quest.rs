//! `Quest` (Tang et al., 2024): per page and KV head the element-wise min and max of the
//! post-RoPE keys; a page's score `Σᵢ max(qᵢ·maxᵢ, qᵢ·minᵢ)` bounds its best attention
//! logit; the top pages per KV head fill the token budget.

use super::{forced_pages, IndexInput, SelectInput, Selection, SparseAlgorithm};
use crate::ops::{quest_meta_update, quest_page_scores, quest_q8_bounds, topk_indices};
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
    /// How a GQA group's query heads combine into one score per page (default: the max
    /// of their bounds).
    pub group_score: GroupScore,
    /// The page size Quest asks of the cache ([`SparseAlgorithm::page_size_hint`]);
    /// default `None`: the cache's own. Smaller pages give finer bounds (and more
    /// metadata: `2 · D` values per page).
    pub page_tokens: Option<usize>,
    /// How the page bounds are stored (default: in the KV dtype, as in the paper).
    pub bounds: BoundsFormat,
}

/// The storage of Quest's page bounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BoundsFormat {
    /// `[pages, 2, D]` in the KV dtype: `4·D` bytes a page in bf16.
    #[default]
    KvDtype,
    /// int8 with a power-of-two scale per page, rounded outward so that the score stays
    /// an upper bound ([`ops::quest_q8`](crate::ops::quest_q8)): `2·D + 16` bytes a page,
    /// 0.53× of bf16 at D = 128, and as many fewer bytes for scoring to read.
    Int8,
}

/// How the upper bounds of a GQA group's query heads become one score per page and KV
/// head (issue 17's options for small budgets).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GroupScore {
    /// The largest of the heads' bounds `Σ_i max(q_i · max_i, q_i · min_i)`: Quest's
    /// criterion (one query head per selection in the paper), taken as a max over the group.
    #[default]
    Max,
    /// The sum over the group's heads of each head's softmax (over the candidate pages
    /// that are not sink or window, at `1/√D`) of its bounds: an estimate of the page's
    /// share of each head's attention, summed over the heads as the attention mass is. A
    /// head whose bounds peak on one page keeps that page even when another head's bounds
    /// are larger everywhere.
    SoftmaxSum,
}

impl Default for QuestConfig {
    fn default() -> Self {
        Self {
            budget_tokens: 1024,
            sink_tokens: 16,
            window_tokens: 32,
            dense_layers: 2,
            shared_across_heads: false,
            group_score: GroupScore::Max,
            page_tokens: None,
            bounds: BoundsFormat::KvDtype,
        }
    }
}

/// Quest page selection. Metadata on the fast tier's device: `[total_pages, 2, D]` (min,
/// max) in the KV dtype — `1/page_size` of the KV bytes — or, with
/// [`BoundsFormat::Int8`], `[total_pages, 2·D + 16]` u8.
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

    /// The metadata tensor (after `init`): `[total_pages, 2, D]` in the KV dtype, or
    /// `[total_pages, 2·D + 16]` u8 with [`BoundsFormat::Int8`].
    pub fn metadata(&self) -> Option<&Tensor> {
        self.meta.as_ref()
    }
}

impl SparseAlgorithm for Quest {
    fn name(&self) -> String {
        let group = match self.cfg.group_score {
            GroupScore::Max => "",
            GroupScore::SoftmaxSum => ", group=softmax-sum",
        };
        let page = self.cfg.page_tokens.map(|p| format!(", page={p}")).unwrap_or_default();
        let bounds = match self.cfg.bounds {
            BoundsFormat::KvDtype => "",
            BoundsFormat::Int8 => ", bounds=int8",
        };
        format!("quest(budget={}{group}{page}{bounds})", self.cfg.budget_tokens)
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
        self.meta = Some(match self.cfg.bounds {
            BoundsFormat::KvDtype => Tensor::zeros((cfg.total_pages(), 2, cfg.head_dim), cfg.dtype, &cfg.device)?,
            BoundsFormat::Int8 => quest_q8_bounds(cfg.total_pages(), cfg.head_dim, &cfg.device)?,
        });
        Ok(())
    }

    fn page_size_hint(&self) -> Option<usize> {
        self.cfg.page_tokens
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
        let scores = match self.cfg.group_score {
            GroupScore::Max => quest_page_scores(input.q, meta, input.candidates, sink, window)?, // [B, Hkv, N]
            GroupScore::SoftmaxSum => softmax_sum_scores(input.q, meta, input.candidates, sink, window)?,
        };
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

/// [`GroupScore::SoftmaxSum`] scores `[B, Hkv, N]` f32 for `q` `[B, Hq, D]` and
/// `candidates` `[B, Hkv, N]`: every query head scored alone (the candidates repeated per
/// head of the group), softmax over each head's non-forced pages, summed over the group;
/// sink and window pages stay `+inf`, padding `-inf`.
fn softmax_sum_scores(q: &Tensor, meta: &Tensor, candidates: &Tensor, sink: usize, window: usize) -> Result<Tensor> {
    let (b, hq, d) = q.dims3()?;
    let (_, hkv, n) = candidates.dims3()?;
    if hkv == 0 || hq % hkv != 0 {
        return quest_page_scores(q, meta, candidates, sink, window); // its error names the shapes
    }
    let g = hq / hkv;
    let per_head = candidates
        .unsqueeze(2)?
        .expand((b, hkv, g, n))?
        .reshape((b, hq, n))?
        .contiguous()?;
    // [B, Hq, N]. Forced and padding pages are the same for every head of a group: read
    // them off the group's first head.
    let s = quest_page_scores(q, meta, &per_head, sink, window)?;
    let first = s.reshape((b, hkv, g, n))?.narrow(2, 0, 1)?.reshape((b, hkv, n))?;
    let (forced, padding) = (first.ge(f64::INFINITY)?, first.le(f64::NEG_INFINITY)?);
    let open = forced
        .unsqueeze(2)?
        .expand((b, hkv, g, n))?
        .reshape((b, hq, n))?
        .where_cond(&Tensor::full(f32::NEG_INFINITY, (b, hq, n), s.device())?, &s)?
        .affine(1.0 / (d as f64).sqrt(), 0.0)?;
    // A row with no open page has max -inf: clamp so that exp gives 0, not NaN.
    let max = open.max_keepdim(2)?.maximum(-1e30)?;
    let e = open.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(2)?.maximum(1e-30)?)?;
    let summed = p.reshape((b, hkv, g, n))?.sum(2)?;
    let full = |v: f32| Tensor::full(v, (b, hkv, n), s.device());
    let summed = padding.where_cond(&full(f32::NEG_INFINITY)?, &summed)?;
    Ok(forced.where_cond(&full(f32::INFINITY)?, &summed)?)
}
