//! The unified partition abstraction: every sparse algorithm sees the context as
//! partitions of whole pages and contributes three steps — **index** (keep metadata as
//! tokens arrive), **select** (choose partitions for the current query under a token
//! budget, always keeping sink, local window and the newest page), **materialize** (make
//! the selected pages available in the fast tier; by default the cache fetches them
//! through the tiers). Attention over the selected pages is one shared op.

pub mod dense;
pub mod quest;
pub mod streaming;

pub use dense::Dense;
pub use quest::{Quest, QuestConfig};
pub use streaming::{Streaming, StreamingConfig};

use crate::{CacheConfig, Result};
use candle_core::Tensor;

/// New keys and values of one layer, after they were written to their pages.
pub struct IndexInput<'a> {
    /// Layer index.
    pub layer: usize,
    /// `[T, Hkv, D]` post-RoPE keys of the step's tokens.
    pub k: &'a Tensor,
    /// `[T, Hkv, D]` keys before RoPE.
    pub k_pre_rope: &'a Tensor,
    /// `[T, Hkv, D]` values.
    pub v: &'a Tensor,
    /// `[T, Hkv]` u32 destination of each (token, head): `host_slot * page_size + row`.
    pub dst: &'a Tensor,
    /// `true` when the cache already updated [`SparseAlgorithm::page_minmax`] with these
    /// keys (fused with its fast-tier write-through); `index` must not widen it again.
    pub minmax_updated: bool,
}

/// What an algorithm sees when it selects pages for the decoding sequences of one layer.
pub struct SelectInput<'a> {
    /// Layer index.
    pub layer: usize,
    /// `[B, Hq, D]` post-RoPE query of each decoding sequence.
    pub q: &'a Tensor,
    /// `[B, Hkv, N]` u32 host slots (= metadata slots) of each sequence's pages in logical
    /// order, padded with [`NONE`](crate::ops::NONE).
    pub candidates: &'a Tensor,
    /// Pages of each sequence (`B` entries).
    pub num_pages: &'a [usize],
    /// Tokens of each sequence, the new one included (`B` entries).
    pub num_tokens: &'a [usize],
    /// Tokens per page.
    pub page_size: usize,
}

/// The pages chosen for the decoding sequences of one layer.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Every page of every sequence.
    All,
    /// `[B, Hkv, K]` u32 logical page numbers per sequence and KV head, padded with
    /// [`NONE`](crate::ops::NONE); shared-across-heads selections repeat one row.
    Pages(Tensor),
}

/// How the selected pages reach the fast tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Materialized {
    /// Fetch them through the tiered cache (hits stay, misses are copied in batches).
    FetchFromTiers,
}

/// A sparse-attention algorithm on the shared page substrate.
///
/// Object-safe: the cache holds a `Box<dyn SparseAlgorithm>`.
pub trait SparseAlgorithm: Send {
    /// Short name with parameters, e.g. `quest(budget=1024)`.
    fn name(&self) -> String;

    /// Pages per partition (the unit of selection).
    fn partition_pages(&self, page_size: usize) -> usize {
        let _ = page_size;
        1
    }

    /// Checks the algorithm against the cache configuration and allocates metadata
    /// (sized to the host tier's page slots). Called once by the cache.
    fn init(&mut self, cfg: &CacheConfig) -> Result<()>;

    /// Index: updates metadata with a layer's new tokens.
    fn index(&mut self, input: &IndexInput<'_>) -> Result<()> {
        let _ = input;
        Ok(())
    }

    /// Per-page key bounds `[host_pages, 2, D]` (min at 0, max at 1 of dim 1; the
    /// semantics of [`quest_meta_update`](crate::ops::quest_meta_update)) that the cache
    /// may update itself in the kernel that stores the keys
    /// ([`paged_append_with_minmax`](crate::ops::paged_append_with_minmax)), then telling
    /// `index` through [`IndexInput::minmax_updated`]. `None` (the default): no such
    /// metadata.
    fn page_minmax(&self) -> Option<&Tensor> {
        None
    }

    /// Select: the pages each decoding sequence attends to in this layer.
    fn select(&mut self, input: &SelectInput<'_>) -> Result<Selection>;

    /// Materialize: how the selected pages reach the fast tier.
    fn materialize(&mut self, layer: usize) -> Result<Materialized> {
        let _ = layer;
        Ok(Materialized::FetchFromTiers)
    }
}

/// Sink and local-window sizes in pages: `ceil(tokens / page_size)`; the window always
/// holds at least the newest page.
pub(crate) fn forced_pages(sink_tokens: usize, window_tokens: usize, page_size: usize) -> (usize, usize) {
    (
        sink_tokens.div_ceil(page_size),
        window_tokens.div_ceil(page_size).max(1),
    )
}

/// Names accepted by [`by_name`].
pub const ALGORITHMS: &[&str] = &["dense", "streaming", "quest"];

/// Builds an algorithm from its name with a token budget (ignored by `dense`):
/// `streaming` keeps a 64-token sink and the rest of the budget as window; `quest` uses
/// its defaults otherwise.
pub fn by_name(name: &str, budget_tokens: usize) -> Result<Box<dyn SparseAlgorithm>> {
    Ok(match name {
        "dense" => Box::new(Dense::new()),
        "streaming" => {
            let sink = 64.min(budget_tokens / 2);
            Box::new(Streaming::new(StreamingConfig {
                sink_tokens: sink,
                window_tokens: budget_tokens.saturating_sub(sink).max(1),
            }))
        }
        "quest" => Box::new(Quest::new(QuestConfig {
            budget_tokens,
            ..Default::default()
        })),
        other => {
            return Err(crate::Error::Config(format!(
                "unknown algorithm `{other}` (known: {})",
                ALGORITHMS.join(", ")
            )))
        }
    })
}
