//! The unified partition abstraction: every sparse algorithm sees the context as
//! partitions of whole pages and contributes three steps — **index** (keep metadata as
//! tokens arrive), **select** (choose partitions for the current query under a token
//! budget, always keeping sink, local window and the newest page), **materialize** (make
//! the selected pages available in the fast tier; by default the cache fetches them
//! through the tiers, or the algorithm rebuilds some pages' keys itself). Attention over
//! the selected pages is one shared op.
//!
//! Algorithms that keep per-sequence state (InfLLM's representative keys, ShadowKV's
//! low-rank key factors) see sequence ids and positions through [`TokenRun`], and are
//! told when a sequence is removed ([`SparseAlgorithm::forget`]) or a step is aborted
//! ([`SparseAlgorithm::truncate`]).

pub mod dense;
pub mod infllm;
pub mod quest;
pub mod shadowkv;
pub mod streaming;

pub use dense::Dense;
pub use infllm::{InfLlm, InfLlmConfig};
pub use quest::{BoundsFormat, GroupScore, Quest, QuestConfig};
pub use shadowkv::{ShadowKv, ShadowKvConfig};
pub use streaming::{Streaming, StreamingConfig};

use crate::ops::NONE;
use crate::{CacheConfig, Result};
use candle_core::{Device, Tensor};

/// The tokens one sequence adds in a step: rows `row..row + n` of the step's tensors,
/// at positions `start..start + n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRun {
    /// Sequence number ([`SeqId::id`](crate::SeqId::id)).
    pub seq: u64,
    /// Tokens the sequence held before the step (= position of the first new token).
    pub start: usize,
    /// New tokens.
    pub n: usize,
    /// Row of the first new token in the step's `[T, ..]` tensors.
    pub row: usize,
    /// The sequence's owner index in the cache (`< CacheConfig::max_sequences`, fixed
    /// while the sequence lives): where algorithms keep per-sequence device state.
    pub owner: u32,
}

impl TokenRun {
    /// The `[R, 4]` u32 runs table `(owner, start, n, row)` of `runs` on `device` (the
    /// form device ops read, e.g. [`crate::ops::infllm`]).
    pub fn table(runs: &[TokenRun], device: &Device) -> Result<Tensor> {
        let v: Vec<u32> = runs
            .iter()
            .flat_map(|r| [r.owner, r.start as u32, r.n as u32, r.row as u32])
            .collect();
        Ok(Tensor::from_vec(v, (runs.len(), 4), device)?)
    }
}

/// New keys and values of one layer, after they were written to their pages.
pub struct IndexInput<'a> {
    /// Layer index.
    pub layer: usize,
    /// The step's sequences, in row order.
    pub runs: &'a [TokenRun],
    /// `[R, 4]` u32 the same runs on the cache device ([`TokenRun::table`]); a padded
    /// step's table also has its padding rows, with `n = 0` (the host `runs` do not).
    pub runs_table: &'a Tensor,
    /// `[T, Hq, D]` post-RoPE queries of the step's tokens (they attend after `index`).
    pub q: &'a Tensor,
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
    /// Sequence id of each decoding sequence (`B` entries).
    pub seqs: &'a [u64],
    /// `[B, Hq, D]` post-RoPE query of each decoding sequence.
    pub q: &'a Tensor,
    /// `[B, 4]` u32 runs table of the decode tokens on the cache device: `(owner,
    /// position, 1, row)`, or `n = 0` for a padded step's padding rows.
    pub rows: &'a Tensor,
    /// `[B, Hkv, N]` u32 host slots (= metadata slots) of each sequence's pages in logical
    /// order, padded with [`NONE`].
    pub candidates: &'a Tensor,
    /// Pages of each sequence (`B` entries).
    pub num_pages: &'a [usize],
    /// Tokens of each sequence, the new one included (`B` entries).
    pub num_tokens: &'a [usize],
    /// Tokens per page.
    pub page_size: usize,
    /// `true` when the cache takes this selection to the host as lists (mixed prefill
    /// and decode steps, tracing) and then calls [`SparseAlgorithm::materialize`];
    /// `false` when it stays on the device (then [`SparseAlgorithm::materialize_device`]
    /// follows).
    pub to_host: bool,
}

/// The pages chosen for the decoding sequences of one layer.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Every page of every sequence.
    All,
    /// `[B, Hkv, K]` u32 logical page numbers per sequence and KV head, padded with
    /// [`NONE`]; shared-across-heads selections repeat one row. A row must not name a
    /// page twice nor a page past the sequence's end: the cache may resolve the
    /// selection on the device without checking it on the host.
    Pages(Tensor),
}

impl Selection {
    /// A [`Selection::Pages`] from host lists `lists[b][h]` of logical pages (any
    /// lengths; padded with [`NONE`]). `lists` must hold `B` entries of `kv_heads` lists.
    pub fn from_lists(lists: &[Vec<Vec<u32>>], kv_heads: usize, device: &Device) -> Result<Self> {
        let k = lists.iter().flatten().map(Vec::len).max().unwrap_or(0).max(1);
        let mut flat = vec![NONE; lists.len() * kv_heads * k];
        for (b, heads) in lists.iter().enumerate() {
            for (h, pages) in heads.iter().enumerate().take(kv_heads) {
                let mut pages: Vec<u32> = pages.iter().copied().filter(|&p| p != NONE).collect();
                pages.sort_unstable();
                pages.dedup();
                flat[(b * kv_heads + h) * k..][..pages.len()].copy_from_slice(&pages);
            }
        }
        Ok(Self::Pages(Tensor::from_vec(flat, (lists.len(), kv_heads, k), device)?))
    }
}

/// What an algorithm sees when it materializes the selected pages of one layer.
pub struct MaterializeInput<'a> {
    /// Layer index.
    pub layer: usize,
    /// Sequence id of each decoding sequence (`B` entries).
    pub seqs: &'a [u64],
    /// Tokens of each sequence, the new one included (`B` entries).
    pub num_tokens: &'a [usize],
    /// `pages[b][h]`: the logical pages selected for sequence `b`, KV head `h`, ascending.
    pub pages: &'a [Vec<Vec<u32>>],
    /// Tokens per page.
    pub page_size: usize,
}

/// Pages whose keys the algorithm rebuilt itself (ShadowKV: from a low-rank factor).
/// They are attended from a step-local pool of rebuilt keys plus values gathered from the
/// host tier, not through the tiered cache; the other selected pages are fetched as usual.
#[derive(Debug, Clone)]
pub struct RebuiltKeys {
    /// `pages[b][h]`: rebuilt logical pages (a subset of the selection), ascending.
    pub pages: Vec<Vec<Vec<u32>>>,
    /// `[n, P, D]` post-RoPE keys of those pages in the order `b`, `h`, page (`n` = total
    /// rebuilt pages), in the cache dtype on the cache device.
    pub keys: Tensor,
}

/// Pages an algorithm rebuilt on the device for a decode step whose requests stay on the
/// device ([`SparseAlgorithm::materialize_device`]; ShadowKV's device mode): a step-local
/// page pool of rebuilt keys and their values, attended beside the selection; nothing
/// crosses to the host.
#[derive(Debug, Clone)]
pub struct DeviceRebuilt {
    /// `[B, Hkv, K, 2]` u32 (entry of `pool`, logical page) per decoding row and KV head,
    /// `(NONE, NONE)`-padded. These pages must be absent from the row's selection.
    pub pairs: Tensor,
    /// `[B·Hkv·K, 2, P, D]` pages (post-RoPE keys, values) in the cache dtype on the cache
    /// device.
    pub pool: Tensor,
}

/// How the selected pages reach the fast tier.
#[derive(Debug, Clone)]
pub enum Materialized {
    /// Fetch them through the tiered cache (hits stay, misses are copied in batches).
    FetchFromTiers,
    /// Some pages' keys were rebuilt by the algorithm; the rest are fetched.
    Rebuilt(RebuiltKeys),
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

    /// Per-page key bounds `[total_pages, 2, D]` (min at 0, max at 1 of dim 1; the
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

    /// Materialize: how the selected pages reach the fast tier (called after `select`
    /// when it returned [`Selection::Pages`]).
    fn materialize(&mut self, input: &MaterializeInput<'_>) -> Result<Materialized> {
        let _ = input;
        Ok(Materialized::FetchFromTiers)
    }

    /// Materialize for a step whose requests stay on the device (decode-only, padded or
    /// not): pages the algorithm rebuilt for chunks it chose in this layer's `select`
    /// besides its returned selection, or `None` (the default: nothing rebuilt).
    /// `values` is the fast tier's page pool `[S, 2, P, D]`: when the fast tier holds every
    /// page (direct-mapped), a page's values are at its host slot there (the cache attends
    /// rebuilt pages only then).
    fn materialize_device(&mut self, layer: usize, values: &Tensor) -> Result<Option<DeviceRebuilt>> {
        let _ = (layer, values);
        Ok(None)
    }

    /// `true` when [`materialize`](Self::materialize) may rebuild keys (ShadowKV): the
    /// cache then hands it the selection as host lists. Default `false`.
    fn rebuilds_keys(&self) -> bool {
        false
    }

    /// `true` when a decode step's `index` and `select` are device work only, with no
    /// host data that changes from step to step and no host synchronization: the cache
    /// can then run padded decode steps (the form CUDA graphs capture; see
    /// [`SparseKvCache::begin_padded_decode`](crate::SparseKvCache::begin_padded_decode)).
    /// Default `false`.
    fn device_only_decode(&self) -> bool {
        false
    }

    /// Whether the next decode step of `seqs` can be device work only (given
    /// [`device_only_decode`](Self::device_only_decode)): `false` while one of them still
    /// needs host work at its next decode step (ShadowKV: its prefill is not compressed
    /// in every layer yet); that step then runs as an ordinary one. Default `true`.
    fn decode_ready(&self, seqs: &[u64]) -> bool {
        let _ = seqs;
        true
    }

    /// The page size the algorithm is designed for, if it requires one (ShadowKV: its
    /// chunk size). Model helpers use it to configure the cache.
    fn page_size_hint(&self) -> Option<usize> {
        None
    }

    /// Drops every piece of state kept for `seq` (the cache removed it).
    fn forget(&mut self, seq: u64) {
        let _ = seq;
    }

    /// Rolls `seq`'s state back to its first `len` tokens (the cache aborted a step).
    fn truncate(&mut self, seq: u64, len: usize) {
        let _ = (seq, len);
    }

    /// The open step ended and its work is kept: what the algorithm held only to undo
    /// the step ([`truncate`](Self::truncate)) can go.
    fn commit(&mut self) {}
}

/// Per-(layer, sequence) state of the algorithms that keep one (InfLLM, ShadowKV).
pub(crate) type SeqStates<S> = std::collections::HashMap<(usize, u64), S>;

/// Drops every layer's state of `seq` (for [`SparseAlgorithm::forget`]).
pub(crate) fn forget_seq<S>(states: &mut SeqStates<S>, seq: u64) {
    states.retain(|&(_, s), _| s != seq);
}

/// Rolls back to `len` tokens every layer's state of `seq` that holds more (`tokens`
/// reads a state's count); `roll` does it and returns `false` when it cannot, which drops
/// the state (for [`SparseAlgorithm::truncate`]).
pub(crate) fn truncate_seq<S>(
    states: &mut SeqStates<S>,
    seq: u64,
    len: usize,
    tokens: impl Fn(&S) -> usize,
    mut roll: impl FnMut(&mut S) -> bool,
) {
    states.retain(|&(_, s), st| s != seq || tokens(st) <= len || roll(st));
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
pub const ALGORITHMS: &[&str] = &["dense", "streaming", "quest", "infllm", "shadowkv"];

/// Variants of an algorithm that [`by_name`] also accepts, for comparisons (issue 17's
/// Quest options): `quest-softmax` ([`GroupScore::SoftmaxSum`]), `quest-p8` (8-token
/// pages, [`QuestConfig::page_tokens`]) and `quest-lean` (one sink and one window page of
/// 16 tokens instead of one and two, leaving a page more to retrieval) and `quest-q8`
/// (issue 12's int8 page bounds, [`BoundsFormat::Int8`]); `infllm-b16`: InfLLM with
/// 16-token blocks (its budget's sink and window, and as many blocks as fit in the rest;
/// [`InfLlmConfig::for_budget_with_block`]); `shadowkv-layerwise`: ShadowKV compressing
/// each layer's prefills in that layer's own step ([`ShadowKv::compress_ahead`] off).
pub const VARIANTS: &[&str] = &[
    "quest-softmax",
    "quest-p8",
    "quest-lean",
    "quest-q8",
    "infllm-b16",
    "shadowkv-layerwise",
];

/// Builds an algorithm from its name with a token budget per decode step and KV head
/// (ignored by `dense`): `streaming` keeps a 64-token sink and the rest of the budget as
/// window; `quest` uses its defaults otherwise; `infllm` and `shadowkv` scale their
/// sink, window, block and outlier sizes to the budget ([`InfLlmConfig::for_budget`],
/// [`ShadowKvConfig::for_budget`]) so that every algorithm attends about the same tokens.
///
/// A budget of 0 is an error for every name (`dense` included: a caller asking for no
/// tokens made a mistake, whatever the algorithm).
pub fn by_name(name: &str, budget_tokens: usize) -> Result<Box<dyn SparseAlgorithm>> {
    if (ALGORITHMS.contains(&name) || VARIANTS.contains(&name)) && budget_tokens == 0 {
        return Err(crate::Error::Config(format!(
            "{name}: budget_tokens must be >= 1, got 0 (partition::by_name)"
        )));
    }
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
        "quest-softmax" => Box::new(Quest::new(QuestConfig {
            budget_tokens,
            group_score: GroupScore::SoftmaxSum,
            ..Default::default()
        })),
        "quest-p8" => Box::new(Quest::new(QuestConfig {
            budget_tokens,
            page_tokens: Some(8),
            ..Default::default()
        })),
        "quest-lean" => Box::new(Quest::new(QuestConfig {
            budget_tokens,
            window_tokens: 16,
            ..Default::default()
        })),
        "quest-q8" => Box::new(Quest::new(QuestConfig {
            budget_tokens,
            bounds: BoundsFormat::Int8,
            ..Default::default()
        })),
        "infllm" => Box::new(InfLlm::new(InfLlmConfig::for_budget(budget_tokens))?),
        "infllm-b16" => Box::new(InfLlm::new(InfLlmConfig::for_budget_with_block(budget_tokens, 16))?),
        "shadowkv" => Box::new(ShadowKv::new(ShadowKvConfig::for_budget(budget_tokens))?),
        "shadowkv-layerwise" => {
            Box::new(ShadowKv::new(ShadowKvConfig::for_budget(budget_tokens))?.compress_ahead(false))
        }
        other => {
            return Err(crate::Error::Config(format!(
                "unknown algorithm `{other}` (known: {}; variants: {})",
                ALGORITHMS.join(", "),
                VARIANTS.join(", ")
            )))
        }
    })
}
