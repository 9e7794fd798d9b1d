//! The public face of the cache: the [`SparseKvCache`] trait that model code calls once
//! per layer per step, and the plain types it speaks ([`SeqId`], [`StepInput`],
//! [`StepStats`], [`SelectionRecord`], [`PoolUsage`], [`PaddedShape`]).

use crate::config::CacheConfig;
use crate::Result;
use candle_core::Tensor;

/// Handle of a sequence in the cache that issued it ([`SparseKvCache::add_sequence`]).
///
/// A `SeqId` names its cache too: handing it to another cache is an error, never a
/// silent access to some other sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId {
    pub(super) cache: u64,
    pub(super) id: u64,
}

impl SeqId {
    /// The sequence's number within its cache (0, 1, 2, … in order of `add_sequence`):
    /// the `seq` that algorithms ([`TokenRun::seq`](crate::partition::TokenRun::seq)), selection records and errors show.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sequence {} of cache {}", self.id, self.cache)
    }
}

/// Source of cache ids: every cache gets its own, so `SeqId`s of different caches differ.
pub(super) static NEXT_CACHE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// One sequence's share of a step: `new_tokens >= 1` tokens appended at its end
/// (prefill and decode share the call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepInput {
    /// The sequence.
    pub seq: SeqId,
    /// Tokens this step adds (the rows of `q`, `k`, `v` in `attend`, in step order).
    pub new_tokens: usize,
}

/// The fixed shape of a padded decode step ([`SparseKvCache::begin_padded_decode`]):
/// what a CUDA graph of the whole decode step is captured for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PaddedShape {
    /// Rows of `q`/`k`/`v` (and sequences): the real ones first, then padding rows.
    pub batch: usize,
    /// Logical pages every row's candidates span (at least the longest sequence's).
    pub pages: usize,
}

/// Counters of one step (summed over layers) or of the cache's lifetime.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepStats {
    /// Steps counted.
    pub steps: u64,
    /// Decode (one-token) sequence-steps counted, per layer.
    pub decode_rows: u64,
    /// Pages attended by decode queries (per KV head), summed over layers.
    pub pages_attended: u64,
    /// Pages that existed for those decode queries (per KV head), summed over layers.
    pub pages_available: u64,
    /// Page requests served from the fast tier.
    pub hits: u64,
    /// Page requests fetched from the host tier into the fast tier.
    pub misses: u64,
    /// Bytes read from the host tier (misses, spilled pages, rebuilt pages' values whose
    /// home is the host tier).
    pub bytes_moved: u64,
    /// Page requests the fast tier could not place in their step (every way of their
    /// bucket already held a page of that layer's step): attended straight from the host
    /// tier, not cached.
    pub spilled: u64,
    /// Pages attended with keys rebuilt by the algorithm (ShadowKV), values read from
    /// their homes (those read from the host tier count in `bytes_moved`; none count in
    /// `hits`/`misses`).
    pub rebuilt_pages: u64,
}

impl StepStats {
    /// Fraction of the available KV that decode queries attended (1.0 for dense).
    pub fn attended_fraction(&self) -> f64 {
        if self.pages_available == 0 {
            1.0
        } else {
            self.pages_attended as f64 / self.pages_available as f64
        }
    }

    /// Fast-tier hit rate of page requests (spilled requests count as misses).
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses + self.spilled;
        if total == 0 {
            1.0
        } else {
            self.hits as f64 / total as f64
        }
    }

    pub(super) fn add(&mut self, o: &StepStats) {
        self.steps += o.steps;
        self.decode_rows += o.decode_rows;
        self.pages_attended += o.pages_attended;
        self.pages_available += o.pages_available;
        self.hits += o.hits;
        self.misses += o.misses;
        self.bytes_moved += o.bytes_moved;
        self.spilled += o.spilled;
        self.rebuilt_pages += o.rebuilt_pages;
    }
}

/// One recorded selection: the logical pages a decoding sequence attended in one layer
/// and KV head (see [`SpinCache::set_trace`](crate::SpinCache::set_trace)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectionRecord {
    /// Step number (1-based over the cache's lifetime).
    pub step: u64,
    /// Layer.
    pub layer: u32,
    /// Sequence.
    pub seq: u64,
    /// KV head.
    pub kv_head: u32,
    /// Pages in the sequence at that step.
    pub num_pages: u32,
    /// Selected logical pages, ascending.
    pub pages: Vec<u32>,
}

/// Page-slot usage of both tiers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUsage {
    /// Pages in use whose home is the host tier.
    pub host_used: usize,
    /// Host-tier capacity ([`CacheConfig::host_pages`](crate::CacheConfig::host_pages),
    /// rounded down to whole page groups under [`PageLayout::ByDirectory`](crate::PageLayout::ByDirectory)).
    pub host_capacity: usize,
    /// Fast-tier slots holding a page: cached copies plus pages homed there.
    pub fast_resident: usize,
    /// Fast-tier slots in all (cache slots plus fast homes).
    pub fast_capacity: usize,
    /// Pages in use whose home is the fast tier.
    pub fast_home_used: usize,
    /// Pages that can have their home in the fast tier
    /// ([`CacheConfig::fast_home_pages`](crate::CacheConfig::fast_home_pages), rounded as
    /// `host_capacity` is).
    pub fast_home_capacity: usize,
    /// Bytes of the two-level page tables.
    pub page_table_bytes: usize,
}

/// The interface model code uses: once per layer per step.
///
/// ```ignore
/// cache.begin_step(&[StepInput { seq, new_tokens: n }])?;
/// for layer in 0..num_layers {
///     // q: [tokens, Hq, D], k/v: [tokens, Hkv, D], pre-RoPE, ragged over the batch
///     let out = cache.attend(layer, &q, &k, &v)?; // [tokens, Hq, D]
/// }
/// cache.end_step()?;
/// ```
///
/// Object-safe: `Box<dyn SparseKvCache>` lets model code switch algorithms at run time.
pub trait SparseKvCache: Send {
    /// The configuration.
    fn config(&self) -> &CacheConfig;
    /// The algorithm's name with its parameters.
    fn algorithm_name(&self) -> String;
    /// Registers an empty sequence.
    fn add_sequence(&mut self) -> Result<SeqId>;
    /// Removes a sequence and frees its pages in both tiers.
    fn remove_sequence(&mut self, seq: SeqId) -> Result<()>;
    /// Tokens stored for `seq`.
    fn sequence_len(&self, seq: SeqId) -> Result<usize>;
    /// Gives `seq` pages for `tokens` tokens now (its length stays): steps that grow it
    /// within them allocate no page, so its decode steps never start one on the host (a
    /// step in which many sequences start pages together costs the most host time). The
    /// pages are freed with the sequence; holding pages for more tokens than `tokens`
    /// already is a no-op. All or nothing:
    /// [`Error::PoolExhausted`](crate::Error::PoolExhausted) (back-pressure) when the
    /// pool lacks them, [`Error::Invalid`](crate::Error::Invalid) past
    /// [`CacheConfig::max_seq_len`], [`Error::StepMisuse`](crate::Error::StepMisuse)
    /// inside a step; nothing changes then. The default (a cache that allocates on demand
    /// only) does nothing.
    fn reserve(&mut self, seq: SeqId, tokens: usize) -> Result<()> {
        let _ = (seq, tokens);
        Ok(())
    }
    /// Starts a step: reserves pages for every sequence's new tokens (all or nothing;
    /// [`Error::PoolExhausted`](crate::Error::PoolExhausted) is back-pressure) and fixes their positions.
    fn begin_step(&mut self, inputs: &[StepInput]) -> Result<()>;
    /// Attention of one layer: applies RoPE to `q` and `k` at the step's positions,
    /// stores `k`/`v`, selects pages and attends.
    ///
    /// * `q` — `[T, Hq, D]`, `k`, `v` — `[T, Hkv, D]`, pre-RoPE, rows in step order
    ///   (`T` = the step's total new tokens), in the cache's dtype and device.
    ///
    /// Returns `[T, Hq, D]` in the cache's dtype.
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor>;
    /// Ends the step once every layer attended; returns its counters.
    fn end_step(&mut self) -> Result<StepStats>;
    /// Abandons a step: new pages are freed and lengths restored.
    fn abort_step(&mut self) -> Result<()>;
    /// Lifetime counters.
    fn stats(&self) -> StepStats;
    /// Slot usage of both tiers.
    fn pool_usage(&self) -> PoolUsage;

    /// The padded shape a decode-only step of `inputs` (every `new_tokens == 1`) would
    /// run at, or `None` when this cache cannot run it padded (the default; see
    /// [`begin_padded_decode`](Self::begin_padded_decode)).
    fn padded_shape(&self, _inputs: &[StepInput]) -> Option<PaddedShape> {
        None
    }

    /// Starts a decode-only step of fixed shape, the form a CUDA graph of the whole
    /// step is captured in and replayed with: like [`begin_step`](Self::begin_step),
    /// but every input of the step's device work is written in place into buffers this
    /// cache keeps per `shape`, and `attend` takes `[shape.batch, H, D]` rows: the
    /// `inputs` first, then padding rows, which attend nothing, store nothing, and whose
    /// outputs are unspecified (finite). Two padded steps of one shape run the same
    /// device work on the same buffers.
    ///
    /// Errors as `begin_step`, and with [`Error::Invalid`](crate::Error::Invalid) when an
    /// input brings more than one token, `shape` is smaller than
    /// [`padded_shape`](Self::padded_shape), or this cache has no padded steps (the
    /// default).
    fn begin_padded_decode(&mut self, inputs: &[StepInput], shape: PaddedShape) -> Result<()> {
        self.begin_padded_decode_with(inputs, shape, &[]).map(|_| ())
    }

    /// [`begin_padded_decode`](Self::begin_padded_decode), with `extra` words of the
    /// caller's (e.g. the step's token ids and sampling rows) staged with the step's own
    /// inputs and copied to the device in the same host-to-device copy, at the step's
    /// preparation ([`prepare_padded_step`](Self::prepare_padded_step), or its first
    /// `attend`). Returns their device buffer, `[n]` u32 (`n = extra.len()`), one of
    /// `shape`'s: the same address at every step of that shape, so a graph captured from
    /// one step reads the next step's words. `n` is
    /// fixed by a shape's first step; a different `n` later is
    /// [`Error::Invalid`](crate::Error::Invalid) (nothing is changed). A cache with padded
    /// steps implements this (`begin_padded_decode` calls it); the engine uses it.
    fn begin_padded_decode_with(
        &mut self,
        _inputs: &[StepInput],
        _shape: PaddedShape,
        _extra: &[u32],
    ) -> Result<Tensor> {
        Err(crate::Error::Invalid {
            op: "SparseKvCache::begin_padded_decode",
            msg: format!("{} has no padded decode steps", self.algorithm_name()),
        })
    }

    /// Runs the open padded step's device preparation now, unless it ran: the copy of the
    /// words [`begin_padded_decode_with`](Self::begin_padded_decode_with) staged (the
    /// step's own and the caller's `extra`), and the plan and RoPE tables computed from
    /// them. The step's first `attend` runs it otherwise. A caller that reads its `extra`
    /// words on the device before the first `attend` (the engine's token ids, for its
    /// embedding) calls this first; inside a captured step the graph holds it.
    ///
    /// [`Error::StepMisuse`](crate::Error::StepMisuse) when no padded step is open or the
    /// open one is poisoned; a failure poisons the step (abort it).
    fn prepare_padded_step(&mut self) -> Result<()> {
        Err(crate::Error::Invalid {
            op: "SparseKvCache::prepare_padded_step",
            msg: format!("{} has no padded decode steps", self.algorithm_name()),
        })
    }

    /// Marks the open padded step's layers as attended because the caller replayed a
    /// graph captured from an earlier padded step of the same shape (and the same
    /// [`graph_epoch`](Self::graph_epoch)) instead of calling `attend`.
    fn padded_step_replayed(&mut self) -> Result<()> {
        Err(crate::Error::Invalid {
            op: "SparseKvCache::padded_step_replayed",
            msg: format!("{} has no padded decode steps", self.algorithm_name()),
        })
    }

    /// Changes whenever a device buffer that captured step work reads is replaced (a
    /// captured graph is then stale and must be captured again).
    fn graph_epoch(&self) -> u64 {
        0
    }

    /// Starts (`true`) or stops recording every decode selection, as
    /// [`SpinCache::set_trace`](crate::SpinCache::set_trace) does, through the trait
    /// (e.g. from an [`Engine`](crate::engine::Engine)). Recording turns padded decode
    /// steps off. [`Error::Invalid`](crate::Error::Invalid) for a cache that records no
    /// selections (the default).
    fn record_selections(&mut self, _on: bool) -> Result<()> {
        Err(crate::Error::Invalid {
            op: "SparseKvCache::record_selections",
            msg: format!("{} records no selections", self.algorithm_name()),
        })
    }

    /// The selections recorded since the last call (empty when nothing was recorded).
    fn take_selections(&mut self) -> Vec<SelectionRecord> {
        Vec::new()
    }
}
