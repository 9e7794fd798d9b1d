//! The public face: the [`SparseKvCache`] trait that model code calls once per layer per
//! step, and [`SpinCache`], which composes the tiered page pool, the two-level page
//! tables, a [`SparseAlgorithm`] and the ops.

use crate::config::CacheConfig;
use crate::error::Tier;
use crate::meta::{DeviceTables, PageTables, LEAF_PAGES};
use crate::ops::{self, AttentionPartial, PageList, NONE};
use crate::partition::{
    IndexInput, MaterializeInput, Materialized, RebuiltKeys, SelectInput, Selection, SparseAlgorithm, TokenRun,
};
use crate::pool::{BudgetPolicy, BudgetTracker, SlotAllocator};
use crate::rope::{apply_rope, rope_tables};
use crate::tiered::{DeviceLru, HostTier, ResolveRequest};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// Handle of a sequence in the cache that issued it ([`SparseKvCache::add_sequence`]).
///
/// A `SeqId` names its cache too: handing it to another cache is an error, never a
/// silent access to some other sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId {
    cache: u64,
    id: u64,
}

impl SeqId {
    /// The sequence's number within its cache (0, 1, 2, … in order of `add_sequence`):
    /// the `seq` that algorithms ([`TokenRun::seq`]), selection records and errors show.
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
static NEXT_CACHE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// One sequence's share of a step: `new_tokens >= 1` tokens appended at its end
/// (prefill and decode share the call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepInput {
    /// The sequence.
    pub seq: SeqId,
    /// Tokens this step adds (the rows of `q`, `k`, `v` in `attend`, in step order).
    pub new_tokens: usize,
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
    /// Bytes read from the host tier (misses, spilled pages, rebuilt pages' values).
    pub bytes_moved: u64,
    /// Page requests the fast tier could not place in their step (every way of their
    /// bucket already held a page of that layer's step): attended straight from the host
    /// tier, not cached.
    pub spilled: u64,
    /// Pages attended with keys rebuilt by the algorithm (ShadowKV), values fetched from
    /// the host tier (counted in `bytes_moved`, not in `hits`/`misses`).
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

    fn add(&mut self, o: &StepStats) {
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
/// and KV head (see [`SpinCache::set_trace`]).
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    /// Host-tier slots in use / total.
    pub host_used: usize,
    /// Host-tier capacity.
    pub host_capacity: usize,
    /// Fast-tier slots holding a page / total.
    pub fast_resident: usize,
    /// Fast-tier capacity.
    pub fast_capacity: usize,
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
    /// Starts a step: reserves pages for every sequence's new tokens (all or nothing;
    /// [`Error::PoolExhausted`] is back-pressure) and fixes their positions.
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
}

#[derive(Debug, Clone)]
struct StepEntry {
    seq: u64,
    /// Tokens before this step.
    start: usize,
    /// New tokens.
    n: usize,
    /// Row of the first new token in `q`/`k`/`v`.
    row: usize,
    /// Pages allocated by this step (per directory).
    new_pages: usize,
}

#[derive(Debug)]
struct StepState {
    entries: Vec<StepEntry>,
    total: usize,
    cos: Tensor,
    sin: Tensor,
    /// `[T, 2]` (entry index, position) per token, on the device.
    queries: Tensor,
    /// `[S]` u32 per entry: the tokens its queries may see in the paged part (decode:
    /// all, the new token included; prefill: the tokens before the step).
    kv_limit: Tensor,
    attended: Vec<bool>,
    /// Decode pages attended, counted on the device (read at `end_step`).
    attended_pages: Option<Tensor>,
    /// Per entry: whether it asked for any page this step (its reuse then counts
    /// towards its fast-tier budget, as the simulator counts it).
    requested: Vec<bool>,
    stats: StepStats,
    /// Set when an `attend` failed past its input validation: the step is poisoned and
    /// only `abort_step` may follow (the message says where it failed).
    failed: Option<String>,
}

/// Where a layer's page requests were built.
enum Requests {
    /// On the host: per entry, per KV head, logical pages (ascending).
    Lists(Vec<Vec<Vec<u32>>>),
    /// A decode-only step's selection `[S, Hkv, K]` logical pages, left on the device.
    Device(Tensor),
}

/// Page requests of one layer laid out `[S, Hkv, N]` (entry, KV head, `NONE`-padded)
/// u32, on the cache's device.
struct PageRequests {
    host_slots: Tensor,
    logical: Tensor,
    owners: Tensor,
}

/// A sparse KV cache: tiered page pool + two-level page tables + one algorithm.
pub struct SpinCache {
    /// This cache's id (in every `SeqId` it issues).
    id: u64,
    cfg: CacheConfig,
    algo: Box<dyn SparseAlgorithm>,
    host: HostTier,
    fast_pool: Tensor,
    host_alloc: SlotAllocator,
    lru: DeviceLru,
    budgets: BudgetTracker,
    tables: PageTables,
    device_tables: DeviceTables,
    /// Owner index (LRU budgets, reuse counters) of each live sequence.
    owners: HashMap<u64, u32>,
    free_owners: Vec<u32>,
    lens: HashMap<u64, usize>,
    next_seq: u64,
    step: Option<StepState>,
    total: StepStats,
    scale: f32,
    trace: Option<Vec<SelectionRecord>>,
}

impl std::fmt::Debug for SpinCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpinCache")
            .field("algorithm", &self.algo.name())
            .field("config", &self.cfg)
            .field("sequences", &self.lens.len())
            .field("usage", &self.pool_usage())
            .finish()
    }
}

impl SpinCache {
    /// Builds a cache; validates `cfg` and the algorithm against it.
    pub fn new(cfg: CacheConfig, algo: impl SparseAlgorithm + 'static) -> Result<Self> {
        Self::new_boxed(cfg, Box::new(algo))
    }

    /// [`SpinCache::new`] with an already boxed algorithm (chosen at run time).
    pub fn new_boxed(cfg: CacheConfig, mut algo: Box<dyn SparseAlgorithm>) -> Result<Self> {
        cfg.validate()?;
        algo.init(&cfg)?;
        let (p, d) = (cfg.page_size, cfg.head_dim);
        let buckets = cfg.fast_pages / cfg.lru_ways;
        let fast_pool = Tensor::zeros((buckets * cfg.lru_ways, 2, p, d), cfg.dtype, &cfg.device)?;
        let dirs = cfg.num_layers * cfg.num_kv_heads;
        let max_rows = cfg.max_sequences * dirs;
        let leaves_per_row = cfg.max_seq_len.div_ceil(p).div_ceil(LEAF_PAGES);
        let arena = cfg.host_pages.div_ceil(LEAF_PAGES) + max_rows;
        let mut cache = Self {
            id: NEXT_CACHE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            host: HostTier::new(&cfg)?,
            host_alloc: SlotAllocator::new(Tier::Host, cfg.host_pages),
            lru: DeviceLru::new(buckets, cfg.lru_ways, cfg.max_sequences, cfg.host_pages, &cfg.device)?,
            budgets: BudgetTracker::new(cfg.budget_policy, buckets * cfg.lru_ways),
            tables: PageTables::new(cfg.num_layers, cfg.num_kv_heads),
            device_tables: DeviceTables::with_capacity(max_rows, leaves_per_row, arena, dirs, &cfg.device)?,
            owners: HashMap::new(),
            free_owners: (0..cfg.max_sequences as u32).rev().collect(),
            scale: 1.0 / (d as f32).sqrt(),
            cfg,
            algo,
            fast_pool,
            lens: HashMap::new(),
            next_seq: 0,
            step: None,
            total: StepStats::default(),
            trace: None,
        };
        cache.upload_budgets()?;
        Ok(cache)
    }

    /// Copies the budget tracker's per-sequence budgets to the LRU, by owner index
    /// (slots without a live sequence get the whole capacity, as the tracker does).
    fn upload_budgets(&mut self) -> Result<()> {
        let b = self.budget_vector(&self.budgets);
        self.lru.set_budgets(&b)
    }

    /// Per owner index, the budget `budgets` gives its sequence (the whole capacity for
    /// owner indices without a live sequence).
    fn budget_vector(&self, budgets: &BudgetTracker) -> Vec<u32> {
        let cap = self.lru.capacity();
        let mut b = vec![cap.min(u32::MAX as usize) as u32; self.cfg.max_sequences];
        for (&seq, &owner) in &self.owners {
            b[owner as usize] = budgets.budget(seq).min(u32::MAX as usize) as u32;
        }
        b
    }

    /// Starts (`true`) or stops recording every decode selection (per step, layer,
    /// sequence and KV head) for offline study of cache policies.
    pub fn set_trace(&mut self, on: bool) {
        self.trace = if on {
            Some(self.trace.take().unwrap_or_default())
        } else {
            None
        };
    }

    /// Takes the selections recorded since the last call.
    pub fn take_trace(&mut self) -> Vec<SelectionRecord> {
        self.trace.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Checks pool accounting: every page of every sequence has exactly one host slot,
    /// owned by the allocator and by nobody else; the used count equals the pages held;
    /// every fast-tier resident is a live page. Returns a description of the first
    /// violation.
    pub fn verify_accounting(&self) -> Result<()> {
        let bad = |msg: String| {
            Err(Error::Invalid {
                op: "SpinCache::verify_accounting",
                msg,
            })
        };
        let mut seen = vec![false; self.host_alloc.capacity()];
        let mut total = 0;
        let mut slots = Vec::new();
        for (&seq, &len) in &self.lens {
            let pages = self.tables.num_pages(seq)?;
            if pages != len.div_ceil(self.cfg.page_size) {
                return bad(format!("sequence {seq}: {len} tokens but {pages} pages"));
            }
            for dir in 0..self.dirs() {
                slots.clear();
                self.tables.extend_slots(seq, dir, &mut slots)?;
                for &s in &slots {
                    if !self.host_alloc.is_owned(s) {
                        return bad(format!(
                            "sequence {seq} holds slot {s}, which the allocator says is free"
                        ));
                    }
                    if std::mem::replace(&mut seen[s as usize], true) {
                        return bad(format!("slot {s} is owned twice"));
                    }
                    total += 1;
                }
            }
        }
        if total != self.host_alloc.used_count() {
            return bad(format!(
                "{} slots allocated but {total} held by sequences (leak)",
                self.host_alloc.used_count()
            ));
        }
        let (tags, _, _) = self.lru.snapshot()?;
        for page in tags.into_iter().filter(|&t| t != NONE) {
            if !seen.get(page as usize).copied().unwrap_or(false) {
                return bad(format!("fast tier holds page {page}, which no sequence owns"));
            }
        }
        Ok(())
    }

    fn dirs(&self) -> usize {
        self.cfg.num_layers * self.cfg.num_kv_heads
    }

    /// The number of `seq` in this cache, after checking that this cache issued it and
    /// that it is live.
    fn live(&self, op: &'static str, seq: SeqId) -> Result<u64> {
        if seq.cache != self.id {
            return Err(Error::Invalid {
                op,
                msg: format!("{seq} was issued by another cache (this is cache {})", self.id),
            });
        }
        if !self.lens.contains_key(&seq.id) {
            return Err(Error::UnknownSequence(seq.id));
        }
        Ok(seq.id)
    }

    /// Host slots of the pages `entry`'s step added to its sequence (every directory).
    fn step_slots(&self, entry: &StepEntry) -> Result<Vec<u32>> {
        let mut all = Vec::new();
        let mut buf = Vec::new();
        for dir in 0..self.dirs() {
            buf.clear();
            self.tables.extend_slots(entry.seq, dir, &mut buf)?;
            all.extend_from_slice(&buf[buf.len().saturating_sub(entry.new_pages)..]);
        }
        Ok(all)
    }

    /// The device side of aborting a step of `entries`, safe to repeat.
    fn abort_device_work(&mut self, entries: &[StepEntry]) -> Result<()> {
        let mut slots = Vec::new();
        for e in entries {
            slots.extend(self.step_slots(e)?);
        }
        // Per-page key bounds of the pages the step wrote into but does not own.
        self.restore_page_minmax(entries)?;
        // The step's counters are dropped; the recency it gave to pages stays (harmless:
        // residency never changes an output).
        self.lru.take_step_counters()?;
        // Drop the new pages' fast copies (last: the one change `pool_usage` shows).
        self.lru.invalidate(&slots)
    }

    /// Host bookkeeping of undoing `entry`'s reservation: its new pages go back to the
    /// allocator and its length to `start`. The pages' fast copies must be gone already.
    fn unreserve(&mut self, entry: &StepEntry) -> Result<()> {
        for slot in self.tables.pop_pages(entry.seq, entry.new_pages)? {
            self.host_alloc.free(slot)?;
        }
        if let Some(l) = self.lens.get_mut(&entry.seq) {
            *l = entry.start;
        }
        Ok(())
    }

    /// Recomputes the per-page key bounds ([`SparseAlgorithm::page_minmax`], Quest's
    /// min/max) of every page that held tokens before the step and received the step's
    /// tokens too: from the keys the host tier holds for its first `start % P` rows, in
    /// row order, exactly as [`ops::quest_meta_update`] built them. Pages the step
    /// allocated are freed instead (their bounds reset when a token lands in row 0).
    fn restore_page_minmax(&mut self, entries: &[StepEntry]) -> Result<()> {
        // A clone shares the algorithm's storage: the update below is in place.
        let Some(meta) = self.algo.page_minmax().cloned() else {
            return Ok(());
        };
        let (p, d, dirs) = (self.cfg.page_size, self.cfg.head_dim, self.dirs());
        let dev = self.cfg.device.clone();
        for e in entries.iter().filter(|e| e.start % p != 0) {
            let (page, rows) = (e.start / p, e.start % p);
            let mut slots = Vec::with_capacity(dirs);
            for dir in 0..dirs {
                slots.push(self.tables.get(e.seq, dir, page)?);
            }
            let pairs: Vec<u32> = slots.iter().enumerate().flat_map(|(i, &s)| [s, i as u32]).collect();
            let pages = Tensor::zeros((dirs, 2, p, d), self.cfg.dtype, &dev)?;
            self.host.gather(&pages, &Tensor::from_vec(pairs, (dirs, 2), &dev)?)?;
            // [rows, dirs, D]: row r of every page is "token" r, each page a "head".
            let keys = pages
                .narrow(1, 0, 1)?
                .narrow(2, 0, rows)?
                .squeeze(1)?
                .transpose(0, 1)?
                .to_device(meta.device())?
                .contiguous()?;
            let dst: Vec<u32> = (0..rows as u32)
                .flat_map(|r| slots.iter().map(move |&s| s * p as u32 + r))
                .collect();
            let dst = Tensor::from_vec(dst, (rows, dirs), meta.device())?;
            ops::quest_meta_update(&meta, &keys, &dst, p)?;
        }
        Ok(())
    }

    fn check_qkv(&self, step: &StepState, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        const OP: &str = "SparseKvCache::attend";
        let c = &self.cfg;
        if layer >= c.num_layers {
            crate::invalid!(OP, "layer {layer} out of range: the cache has {} layers", c.num_layers);
        }
        if step.attended[layer] {
            return Err(Error::StepMisuse {
                op: OP,
                msg: format!("layer {layer} already attended in this step"),
            });
        }
        let t = step.total;
        let want = |name: &str, x: &Tensor, h: usize| -> Result<()> {
            if x.dims() != [t, h, c.head_dim] {
                crate::invalid!(
                    OP,
                    "{name} must be [T={t}, H={h}, D={}] (the step's tokens, heads, head_dim), got {:?}",
                    c.head_dim,
                    x.dims()
                );
            }
            if x.dtype() != c.dtype {
                crate::invalid!(
                    OP,
                    "{name} {:?} has dtype {:?}, the cache stores {:?}",
                    x.dims(),
                    x.dtype(),
                    c.dtype
                );
            }
            if !x.device().same_device(&c.device) {
                crate::invalid!(
                    OP,
                    "{name} {:?} is on {:?}, the cache is on {:?}",
                    x.dims(),
                    x.device().location(),
                    c.device.location()
                );
            }
            Ok(())
        };
        want("q", q, c.num_q_heads)?;
        want("k", k, c.num_kv_heads)?;
        want("v", v, c.num_kv_heads)?;
        if c.reject_non_finite {
            for (name, x) in [("q", q), ("k", k), ("v", v)] {
                let vals = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                if let Some(i) = vals.iter().position(|x| !x.is_finite()) {
                    let (h, d) = (x.dims()[1], c.head_dim);
                    crate::invalid!(
                        OP,
                        "{name} {:?} holds {} at token {}, head {}, element {} (layer {layer}; \
                         CacheConfig::reject_non_finite is on)",
                        x.dims(),
                        vals[i],
                        i / (h * d),
                        i / d % h,
                        i % d
                    );
                }
            }
        }
        Ok(())
    }

    /// `[T, Hkv]` destinations `host_slot * P + row` of the step's tokens in `layer`.
    fn host_destinations(&self, step: &StepState, layer: usize) -> Result<Vec<u32>> {
        let (p, hkv) = (self.cfg.page_size, self.cfg.num_kv_heads);
        let mut dst = vec![NONE; step.total * hkv];
        for e in &step.entries {
            for i in 0..e.n {
                let pos = e.start + i;
                for h in 0..hkv {
                    let slot = self.tables.get(e.seq, layer * hkv + h, pos / p)?;
                    dst[(e.row + i) * hkv + h] = slot * p as u32 + (pos % p) as u32;
                }
            }
        }
        Ok(dst)
    }

    /// Per entry and KV head, the logical pages to attend in the paged part, and whether
    /// the algorithm returned a page selection (not `All`). A decode-only step whose
    /// selection is a tensor stays on the device ([`Requests::Device`]); otherwise the
    /// lists are built on the host.
    fn page_requests(&mut self, step: &StepState, layer: usize, q_rot: &Tensor) -> Result<(Requests, bool)> {
        let (p, hkv) = (self.cfg.page_size, self.cfg.num_kv_heads);
        let mut req: Vec<Vec<Vec<u32>>> = vec![vec![Vec::new(); hkv]; step.entries.len()];
        // Prefill entries: every page holding earlier tokens (dense).
        let mut decode = Vec::new();
        for (ei, e) in step.entries.iter().enumerate() {
            if e.n == 1 {
                decode.push(ei);
            } else if e.start > 0 {
                let pages: Vec<u32> = (0..e.start.div_ceil(p) as u32).collect();
                req[ei].fill(pages);
            }
        }
        if decode.is_empty() {
            return Ok((Requests::Lists(req), false));
        }
        let num_tokens: Vec<usize> = decode.iter().map(|&ei| step.entries[ei].start + 1).collect();
        let num_pages: Vec<usize> = num_tokens.iter().map(|t| t.div_ceil(p)).collect();
        let nmax = num_pages.iter().copied().max().unwrap_or(0);
        let mut cand = vec![NONE; decode.len() * hkv * nmax];
        let mut buf = Vec::with_capacity(nmax);
        for (bi, &ei) in decode.iter().enumerate() {
            for h in 0..hkv {
                buf.clear();
                self.tables
                    .extend_slots(step.entries[ei].seq, layer * hkv + h, &mut buf)?;
                cand[(bi * hkv + h) * nmax..][..buf.len()].copy_from_slice(&buf);
            }
        }
        let candidates = Tensor::from_vec(cand, (decode.len(), hkv, nmax), &self.cfg.device)?;
        let q_dec = if decode.len() == step.entries.len() {
            // Every entry decodes: one query row each, in order.
            q_rot.clone()
        } else {
            let rows: Vec<u32> = decode.iter().map(|&ei| step.entries[ei].row as u32).collect();
            let rows = Tensor::from_vec(rows, decode.len(), &self.cfg.device)?;
            q_rot.index_select(&rows, 0)?.contiguous()?
        };
        let seqs: Vec<u64> = decode.iter().map(|&ei| step.entries[ei].seq).collect();
        let input = SelectInput {
            layer,
            seqs: &seqs,
            q: &q_dec,
            candidates: &candidates,
            num_pages: &num_pages,
            num_tokens: &num_tokens,
            page_size: p,
        };
        let selection = self.algo.select(&input)?;
        let selected = matches!(selection, Selection::Pages(_));
        let chosen = match selection {
            Selection::All => None,
            Selection::Pages(t) => {
                let (b, h2, k) = t.dims3()?;
                if b != decode.len() || h2 != hkv {
                    return Err(Error::Invalid {
                        op: "SparseAlgorithm::select",
                        msg: format!(
                            "{} returned a selection of shape {:?}, expected [{}, {hkv}, K]",
                            self.algo.name(),
                            t.dims(),
                            decode.len()
                        ),
                    });
                }
                let on_device = decode.len() == step.entries.len()
                    && self.trace.is_none()
                    && !self.algo.rebuilds_keys()
                    && t.dtype() == DType::U32
                    && t.device().same_device(&self.cfg.device);
                if on_device {
                    return Ok((Requests::Device(t), true));
                }
                // Host lists: the selection crosses to the host (mixed prefill/decode
                // steps, tracing, algorithms that rebuild keys).
                Some((t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<u32>()?, k))
            }
        };
        let step_no = self.total.steps + 1;
        for (bi, &ei) in decode.iter().enumerate() {
            let n = num_pages[bi];
            for h in 0..hkv {
                req[ei][h] = match &chosen {
                    None => (0..n as u32).collect(),
                    Some((sel, k)) => {
                        let mut v: Vec<u32> = sel[(bi * hkv + h) * k..][..*k]
                            .iter()
                            .copied()
                            .filter(|&x| x != NONE && (x as usize) < n)
                            .collect();
                        v.sort_unstable();
                        v.dedup();
                        v
                    }
                };
                if let Some(tr) = self.trace.as_mut() {
                    tr.push(SelectionRecord {
                        step: step_no,
                        layer: layer as u32,
                        seq: step.entries[ei].seq,
                        kv_head: h as u32,
                        num_pages: n as u32,
                        pages: req[ei][h].clone(),
                    });
                }
            }
        }
        Ok((Requests::Lists(req), selected))
    }

    /// Owner index of every entry (LRU budgets and reuse counters).
    fn entry_owners(&self, step: &StepState) -> Result<Vec<u32>> {
        step.entries
            .iter()
            .map(|e| self.owners.get(&e.seq).copied().ok_or(Error::UnknownSequence(e.seq)))
            .collect()
    }

    /// Requests of a decode-only step from a selection `[S, Hkv, K]` left on the device:
    /// logical pages → host slots through the device page tables. No host sync.
    fn device_requests(&self, step: &mut StepState, layer: usize, sel: &Tensor) -> Result<PageRequests> {
        let hkv = self.cfg.num_kv_heads;
        let dev = &self.cfg.device;
        let (s, _, k) = sel.dims3()?;
        let mut rows = Vec::with_capacity(s * hkv);
        for e in &step.entries {
            for h in 0..hkv {
                rows.push(self.device_tables.row(e.seq, layer * hkv + h).ok_or(Error::Invalid {
                    op: "SparseKvCache::attend",
                    msg: format!("sequence {} has no device page-table row (internal error)", e.seq),
                })?);
            }
        }
        let rows = Tensor::from_vec(rows, (s, hkv, 1), dev)?
            .broadcast_as((s, hkv, k))?
            .contiguous()?;
        let logical = sel.contiguous()?;
        let queries = Tensor::stack(&[&rows, &logical], 3)?.reshape((s * hkv * k, 2))?;
        let host_slots = self.device_tables.lookup(&queries)?.reshape((s, hkv, k))?;
        let owners = Tensor::from_vec(self.entry_owners(step)?, (s, 1, 1), dev)?
            .broadcast_as((s, hkv, k))?
            .contiguous()?;
        let attended = host_slots.ne(NONE as f64)?.to_dtype(DType::F32)?.sum_all()?;
        step.attended_pages = Some(match step.attended_pages.take() {
            None => attended,
            Some(a) => (a + attended)?,
        });
        Ok(PageRequests {
            host_slots,
            logical,
            owners,
        })
    }

    /// Requests from host lists (per entry and KV head); `None` when no page is asked.
    fn host_requests(&self, step: &StepState, layer: usize, lists: &[Vec<Vec<u32>>]) -> Result<Option<PageRequests>> {
        let hkv = self.cfg.num_kv_heads;
        let s = step.entries.len();
        let n = lists.iter().flatten().map(Vec::len).max().unwrap_or(0);
        if n == 0 {
            return Ok(None);
        }
        let owners = self.entry_owners(step)?;
        let mut host_slots = vec![NONE; s * hkv * n];
        let mut logical = vec![NONE; s * hkv * n];
        let mut owner = vec![NONE; s * hkv * n];
        for (ei, heads) in lists.iter().enumerate() {
            let seq = step.entries[ei].seq;
            for (h, pages) in heads.iter().enumerate() {
                let base = (ei * hkv + h) * n;
                for (j, &lp) in pages.iter().enumerate() {
                    host_slots[base + j] = self.tables.get(seq, layer * hkv + h, lp as usize)?;
                    logical[base + j] = lp;
                    owner[base + j] = owners[ei];
                }
            }
        }
        let dev = &self.cfg.device;
        Ok(Some(PageRequests {
            host_slots: Tensor::from_vec(host_slots, (s, hkv, n), dev)?,
            logical: Tensor::from_vec(logical, (s, hkv, n), dev)?,
            owners: Tensor::from_vec(owner, (s, hkv, n), dev)?,
        }))
    }

    /// Attends the step's queries over the requested pages: one LRU resolve (hits, misses
    /// into empty or evicted ways, spills where a bucket has no way left), one batched
    /// fetch of the misses, attention over the fast tier plus attention over the spilled
    /// pages read straight from the host tier, merged by log-sum-exp. Everything is
    /// enqueued on the device: no host synchronization, no device-to-host copy.
    fn tiered_part(&mut self, step: &StepState, q_rot: &Tensor, r: &PageRequests) -> Result<AttentionPartial> {
        let (s, hkv, n) = r.host_slots.dims3()?;
        let reuse_steps = match self.cfg.budget_policy {
            BudgetPolicy::Dynamic { reuse_steps, .. } => reuse_steps.min(u32::MAX as u64) as u32,
            _ => 0,
        };
        let out = self.lru.resolve(&ResolveRequest {
            host_slots: &r.host_slots.flatten_all()?,
            logical: &r.logical.flatten_all()?,
            owners: &r.owners.flatten_all()?,
            step: (self.total.steps + 1).min(u32::MAX as u64) as u32,
            reuse_steps,
        })?;
        self.host
            .gather_counted(&self.fast_pool, &out.misses, &out.miss_count)?;
        let list = |pairs: &Tensor| -> Result<PageList> {
            Ok(PageList {
                pages: pairs.reshape((s, hkv, n, 2))?,
                queries: step.queries.clone(),
                kv_limit: step.kv_limit.clone(),
            })
        };
        let fast = ops::sparse_paged_attention(q_rot, &self.fast_pool, &list(&out.fast_pairs)?, self.scale)?;
        let spilled = self.host.attend(q_rot, &list(&out.spill_pairs)?, self.scale)?;
        ops::merge_partials(&fast, &spilled)
    }

    /// `[T, Hkv]` fast-tier destinations of the step's tokens: where the home page of a
    /// token is resident, its fast slot · P + row, else `NONE` (computed on the device
    /// from the LRU's tags).
    fn fast_destinations(&self, dst: &[u32], shape: (usize, usize)) -> Result<Tensor> {
        let p = self.cfg.page_size as u32;
        let dev = &self.cfg.device;
        let slots: Vec<u32> = dst.iter().map(|&c| if c == NONE { NONE } else { c / p }).collect();
        let rows: Vec<u32> = dst.iter().map(|&c| if c == NONE { 0 } else { c % p }).collect();
        let n = dst.len();
        let fast = self.lru.lookup(&Tensor::from_vec(slots, n, dev)?)?;
        let resident = fast.ne(NONE as f64)?;
        let none = Tensor::full(NONE, n, dev)?;
        // Zero the non-resident entries before scaling (NONE · P would overflow).
        let fast = resident.where_cond(&fast, &none.zeros_like()?)?;
        let pos = (fast.broadcast_mul(&Tensor::new(p, dev)?)? + Tensor::from_vec(rows, n, dev)?)?;
        Ok(resident.where_cond(&pos, &none)?.reshape(shape)?)
    }

    /// Attends the decode queries over pages whose keys the algorithm rebuilt: a
    /// step-local pool of those keys plus values gathered from the host tier.
    fn rebuilt_part(
        &self,
        step: &mut StepState,
        layer: usize,
        q_rot: &Tensor,
        decode: &[usize],
        rk: &RebuiltKeys,
    ) -> Result<AttentionPartial> {
        const OP: &str = "SparseAlgorithm::materialize";
        let (p, d, hkv) = (self.cfg.page_size, self.cfg.head_dim, self.cfg.num_kv_heads);
        let total: usize = rk.pages.iter().flatten().map(Vec::len).sum();
        if rk.pages.len() != decode.len() || rk.pages.iter().any(|h| h.len() != hkv) {
            crate::invalid!(
                OP,
                "{} rebuilt pages for {} sequences, expected {} sequences × {hkv} KV heads",
                self.algo.name(),
                rk.pages.len(),
                decode.len()
            );
        }
        if rk.keys.dims() != [total, p, d] || rk.keys.dtype() != self.cfg.dtype {
            crate::invalid!(
                OP,
                "{} rebuilt keys {:?} {:?}, expected [{total}, {p}, {d}] {:?}",
                self.algo.name(),
                rk.keys.dims(),
                rk.keys.dtype(),
                self.cfg.dtype
            );
        }
        let mut pairs = Vec::with_capacity(2 * total);
        let nmax = rk.pages.iter().flatten().map(Vec::len).max().unwrap_or(0).max(1);
        let s = step.entries.len();
        let mut list = vec![NONE; s * hkv * nmax * 2];
        for (bi, &ei) in decode.iter().enumerate() {
            let e = &step.entries[ei];
            for (h, pages) in rk.pages[bi].iter().enumerate() {
                let base = (ei * hkv + h) * nmax * 2;
                for (j, &lp) in pages.iter().enumerate() {
                    if lp as usize >= (e.start + 1).div_ceil(p) {
                        crate::invalid!(OP, "{} rebuilt page {lp} past the sequence's end", self.algo.name());
                    }
                    let i = (pairs.len() / 2) as u32;
                    list[base + 2 * j] = i;
                    list[base + 2 * j + 1] = lp;
                    pairs.push(self.tables.get(e.seq, layer * hkv + h, lp as usize)?);
                    pairs.push(i);
                }
            }
        }
        let dev = &self.cfg.device;
        let gathered = Tensor::zeros((total, 2, p, d), self.cfg.dtype, dev)?;
        self.host
            .gather(&gathered, &Tensor::from_vec(pairs, (total, 2), dev)?)?;
        let values = gathered.narrow(1, 1, 1)?;
        let pool = Tensor::cat(&[&rk.keys.unsqueeze(1)?, &values], 1)?.contiguous()?;
        step.stats.rebuilt_pages += total as u64;
        step.stats.bytes_moved += (total * self.cfg.page_bytes() / 2) as u64;
        let list = PageList {
            pages: Tensor::from_vec(list, (s, hkv, nmax, 2), dev)?,
            queries: step.queries.clone(),
            kv_limit: step.kv_limit.clone(),
        };
        ops::sparse_paged_attention(q_rot, &pool, &list, self.scale)
    }
}

impl SparseKvCache for SpinCache {
    fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    fn algorithm_name(&self) -> String {
        self.algo.name()
    }

    fn add_sequence(&mut self) -> Result<SeqId> {
        if self.step.is_some() {
            return Err(Error::StepMisuse {
                op: "SparseKvCache::add_sequence",
                msg: "cannot add a sequence inside a step".into(),
            });
        }
        let Some(&owner) = self.free_owners.last() else {
            return Err(Error::Invalid {
                op: "SparseKvCache::add_sequence",
                msg: format!(
                    "{} sequences are live, the configured maximum (CacheConfig::max_sequences): remove one first",
                    self.cfg.max_sequences
                ),
            });
        };
        let id = self.next_seq;
        self.device_tables.add_sequence(id)?;
        self.free_owners.pop();
        self.next_seq += 1;
        self.tables.add_sequence(id);
        self.lens.insert(id, 0);
        self.owners.insert(id, owner);
        Ok(SeqId { cache: self.id, id })
    }

    fn remove_sequence(&mut self, seq: SeqId) -> Result<()> {
        if self.step.is_some() {
            return Err(Error::StepMisuse {
                op: "SparseKvCache::remove_sequence",
                msg: "cannot remove a sequence inside a step (end or abort it first)".into(),
            });
        }
        let id = self.live("SparseKvCache::remove_sequence", seq)?;
        // The fallible device work first: dropping the pages' fast copies (harmless if the
        // removal then stopped: they are copies). The device page tables are brought in
        // step by the next `begin_step` (their change log keeps the removal).
        let mut slots = Vec::new();
        for dir in 0..self.dirs() {
            self.tables.extend_slots(id, dir, &mut slots)?;
        }
        self.lru.invalidate(&slots)?;
        // Host bookkeeping only from here.
        self.device_tables.remove_sequence(id)?;
        let slots = self.tables.remove_sequence(id)?;
        for slot in slots {
            self.host_alloc.free(slot)?;
        }
        if let Some(owner) = self.owners.remove(&id) {
            self.free_owners.push(owner);
        }
        self.lens.remove(&id);
        self.algo.forget(id);
        self.budgets.remove(id);
        Ok(())
    }

    fn sequence_len(&self, seq: SeqId) -> Result<usize> {
        let id = self.live("SparseKvCache::sequence_len", seq)?;
        Ok(self.lens[&id])
    }

    fn begin_step(&mut self, inputs: &[StepInput]) -> Result<()> {
        const OP: &str = "SparseKvCache::begin_step";
        if self.step.is_some() {
            return Err(Error::StepMisuse {
                op: OP,
                msg: "a step is already open: call end_step or abort_step first".into(),
            });
        }
        if inputs.is_empty() {
            crate::invalid!(OP, "a step needs at least one sequence");
        }
        let p = self.cfg.page_size;
        let mut entries = Vec::with_capacity(inputs.len());
        let mut row = 0usize;
        let mut needed = 0usize;
        for (i, inp) in inputs.iter().enumerate() {
            let seq = self.live(OP, inp.seq)?;
            let len = self.lens[&seq];
            if inputs[..i].iter().any(|o| o.seq == inp.seq) {
                crate::invalid!(OP, "sequence {seq} appears twice in one step");
            }
            if inp.new_tokens == 0 {
                crate::invalid!(OP, "sequence {seq} brings 0 new tokens (need >= 1)");
            }
            // Checked: a huge `new_tokens` must not wrap around the limit.
            let total = len.checked_add(inp.new_tokens).filter(|&t| t <= self.cfg.max_seq_len);
            let Some(total) = total else {
                crate::invalid!(
                    OP,
                    "sequence {seq} holds {len} tokens and brings {} new ones: more than max_seq_len {}",
                    inp.new_tokens,
                    self.cfg.max_seq_len
                );
            };
            let new_pages = total.div_ceil(p) - len.div_ceil(p);
            needed = needed.saturating_add(new_pages.saturating_mul(self.dirs()));
            entries.push(StepEntry {
                seq,
                start: len,
                n: inp.new_tokens,
                row,
                new_pages,
            });
            // Cannot wrap: each sequence holds at most max_seq_len (< 2^32) tokens and at
            // most max_sequences (< 2^32) sequences are live.
            row += inp.new_tokens;
        }
        if needed > self.host_alloc.free_count() {
            return Err(Error::PoolExhausted {
                tier: Tier::Host,
                needed,
                free: self.host_alloc.free_count(),
            });
        }
        // The step's uploads come first: they depend on the entries only, and failing
        // here changes nothing.
        crate::fault::device_call(OP)?;
        let mut positions = Vec::with_capacity(row);
        let mut queries = Vec::with_capacity(2 * row);
        for (ei, e) in entries.iter().enumerate() {
            for i in 0..e.n {
                positions.push((e.start + i) as u32);
                queries.push(ei as u32);
                queries.push((e.start + i) as u32);
            }
        }
        let (cos, sin) = rope_tables(
            &positions,
            self.cfg.head_dim,
            self.cfg.rope_theta,
            self.cfg.dtype,
            &self.cfg.device,
        )?;
        let queries = Tensor::from_vec(queries, (row, 2), &self.cfg.device)?;
        let kv_limit: Vec<u32> = entries
            .iter()
            .map(|e| if e.n == 1 { (e.start + 1) as u32 } else { e.start as u32 })
            .collect();
        let n_entries = entries.len();
        let kv_limit = Tensor::from_vec(kv_limit, n_entries, &self.cfg.device)?;
        // Reserve the pages, then mirror them on the device; if that fails, give them back
        // (the device tables' change log keeps both, so the next apply ends consistent).
        for e in &entries {
            for _ in 0..e.new_pages {
                let slots = self.host_alloc.alloc(self.dirs())?;
                self.tables.push_page(e.seq, &slots)?;
            }
            *self.lens.get_mut(&e.seq).ok_or(Error::UnknownSequence(e.seq))? += e.n;
        }
        if let Err(e) = self.device_tables.apply(&mut self.tables) {
            for en in &entries {
                self.unreserve(en)?;
            }
            return Err(e);
        }
        let stats = StepStats {
            steps: 1,
            ..Default::default()
        };
        self.step = Some(StepState {
            entries,
            total: row,
            cos,
            sin,
            queries,
            kv_limit,
            attended: vec![false; self.cfg.num_layers],
            attended_pages: None,
            requested: vec![false; n_entries],
            stats,
            failed: None,
        });
        Ok(())
    }

    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        const OP: &str = "SparseKvCache::attend";
        let mut step = self.step.take().ok_or(Error::StepMisuse {
            op: OP,
            msg: "no open step: call begin_step first".into(),
        })?;
        let result = match &step.failed {
            Some(why) => Err(Error::StepMisuse {
                op: OP,
                msg: format!("the step is poisoned ({why}): call abort_step, then run the step again"),
            }),
            // Invalid input changes nothing: the step stays usable.
            None => match self.check_qkv(&step, layer, q, k, v) {
                Err(e) => Err(e),
                Ok(()) => {
                    let r = self.attend_in_step(&mut step, layer, q, k, v);
                    if let Err(e) = &r {
                        step.failed = Some(format!("attend of layer {layer} failed: {e}"));
                    }
                    r
                }
            },
        };
        self.step = Some(step);
        result
    }

    fn end_step(&mut self) -> Result<StepStats> {
        let step = self.step.as_ref().ok_or(Error::StepMisuse {
            op: "SparseKvCache::end_step",
            msg: "no open step".into(),
        })?;
        if let Some(why) = &step.failed {
            return Err(Error::StepMisuse {
                op: "SparseKvCache::end_step",
                msg: format!("the step is poisoned ({why}): call abort_step, then run the step again"),
            });
        }
        if let Some(l) = step.attended.iter().position(|a| !a) {
            return Err(Error::StepMisuse {
                op: "SparseKvCache::end_step",
                msg: format!("layer {l} was not attended in this step (attend every layer, or abort_step)"),
            });
        }
        let mut stats = step.stats;
        if let Some(n) = &step.attended_pages {
            stats.pages_attended += n.to_dtype(DType::F64)?.to_scalar::<f64>()? as u64;
        }
        let (reuse, [hits, misses, spilled]) = self.lru.take_step_counters()?;
        stats.hits += hits;
        stats.misses += misses;
        stats.spilled += spilled;
        stats.bytes_moved += (misses + spilled) * self.cfg.page_bytes() as u64;
        // The next budgets are computed aside and committed once uploaded: on an error
        // the step stays open (end_step or abort_step may follow; the counters of the
        // failed attempt are lost to the statistics, nothing else).
        let mut budgets = self.budgets.clone();
        for (e, _) in step.entries.iter().zip(&step.requested).filter(|(_, &r)| r) {
            let owner = self.owners.get(&e.seq).copied().unwrap_or(0) as usize;
            budgets.observe_count(e.seq, reuse.get(owner).copied().unwrap_or(0) as usize);
        }
        budgets.end_step();
        let b = self.budget_vector(&budgets);
        self.lru.set_budgets(&b)?;
        self.budgets = budgets;
        self.step = None;
        self.total.add(&stats);
        Ok(stats)
    }

    fn abort_step(&mut self) -> Result<()> {
        let step = self.step.as_ref().ok_or(Error::StepMisuse {
            op: "SparseKvCache::abort_step",
            msg: "no open step".into(),
        })?;
        let entries = step.entries.clone();
        // The fallible device work first, all of it safe to repeat: on an error the step
        // stays open (poisoned: only abort_step may follow), nothing else changed, and
        // abort_step can be called again.
        if let Err(e) = self.abort_device_work(&entries) {
            if let Some(st) = self.step.as_mut() {
                st.failed.get_or_insert_with(|| format!("abort_step failed: {e}"));
            }
            return Err(e);
        }
        // Host bookkeeping only from here. The device page tables are brought in step by
        // the next `begin_step` (their change log keeps the freed pages).
        for e in &entries {
            self.unreserve(e)?;
            self.algo.truncate(e.seq, e.start);
        }
        let step_no = self.total.steps + 1;
        if let Some(tr) = self.trace.as_mut() {
            tr.retain(|r| r.step != step_no);
        }
        self.step = None;
        Ok(())
    }

    fn stats(&self) -> StepStats {
        self.total
    }

    fn pool_usage(&self) -> PoolUsage {
        PoolUsage {
            host_used: self.host_alloc.used_count(),
            host_capacity: self.host_alloc.capacity(),
            fast_resident: self.lru.resident_count().unwrap_or(0),
            fast_capacity: self.lru.capacity(),
            page_table_bytes: self.tables.bytes(),
        }
    }
}

impl SpinCache {
    fn attend_in_step(
        &mut self,
        step: &mut StepState,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let (p, hkv) = (self.cfg.page_size, self.cfg.num_kv_heads);
        let q_rot = apply_rope(q, &step.cos, &step.sin)?.contiguous()?;
        let k_rot = apply_rope(k, &step.cos, &step.sin)?.contiguous()?;
        let v = v.contiguous()?;

        // Store: home pages in the host tier, write-through to resident fast-tier copies.
        let dst = self.host_destinations(step, layer)?;
        let shape = (step.total, hkv);
        let dst_t = Tensor::from_vec(dst.clone(), shape, &self.cfg.device)?;
        self.host.append(&k_rot, &v, &dst_t)?;
        let fast_dst = self.fast_destinations(&dst, shape)?;
        // Min/max metadata on the fast tier's device: one fused write-through + update.
        let minmax = self
            .algo
            .page_minmax()
            .filter(|m| m.device().same_device(&self.cfg.device));
        if let Some(meta) = minmax {
            ops::paged_append_with_minmax(&self.fast_pool, &k_rot, &v, &fast_dst, meta, &dst_t)?;
        } else {
            ops::paged_append(&self.fast_pool, &k_rot, &v, &fast_dst)?;
        }
        let minmax_updated = minmax.is_some();
        let runs: Vec<TokenRun> = step
            .entries
            .iter()
            .map(|e| TokenRun {
                seq: e.seq,
                start: e.start,
                n: e.n,
                row: e.row,
            })
            .collect();
        self.algo.index(&IndexInput {
            layer,
            runs: &runs,
            q: &q_rot,
            k: &k_rot,
            k_pre_rope: k,
            v: &v,
            dst: &dst_t,
            minmax_updated,
        })?;

        // Select and attend over pages (decode: selected pages incl. the new token;
        // prefill: all earlier pages), then the in-step causal part of prefills.
        let (requests, selected) = self.page_requests(step, layer, &q_rot)?;
        let decode: Vec<usize> = (0..step.entries.len()).filter(|&ei| step.entries[ei].n == 1).collect();
        for &ei in &decode {
            step.stats.decode_rows += 1;
            step.stats.pages_available += ((step.entries[ei].start + 1).div_ceil(p) * hkv) as u64;
        }
        let (tiered, rebuilt) = match requests {
            Requests::Device(sel) => {
                step.requested.fill(true);
                let r = self.device_requests(step, layer, &sel)?;
                (Some(self.tiered_part(step, &q_rot, &r)?), None)
            }
            Requests::Lists(mut req) => {
                for &ei in &decode {
                    step.stats.pages_attended += req[ei].iter().map(|l| l.len() as u64).sum::<u64>();
                }
                let rebuilt = if selected && !decode.is_empty() {
                    let seqs: Vec<u64> = decode.iter().map(|&ei| step.entries[ei].seq).collect();
                    let num_tokens: Vec<usize> = decode.iter().map(|&ei| step.entries[ei].start + 1).collect();
                    let pages: Vec<Vec<Vec<u32>>> = decode.iter().map(|&ei| req[ei].clone()).collect();
                    match self.algo.materialize(&MaterializeInput {
                        layer,
                        seqs: &seqs,
                        num_tokens: &num_tokens,
                        pages: &pages,
                        page_size: p,
                    })? {
                        Materialized::FetchFromTiers => None,
                        Materialized::Rebuilt(rk) => {
                            // Rebuilt pages leave the tiered fetch; they are attended separately.
                            for (bi, &ei) in decode.iter().enumerate() {
                                for (h, rebuilt) in rk.pages.get(bi).into_iter().flatten().enumerate().take(hkv) {
                                    req[ei][h].retain(|lp| rebuilt.binary_search(lp).is_err());
                                }
                            }
                            Some(self.rebuilt_part(step, layer, &q_rot, &decode, &rk)?)
                        }
                    }
                } else {
                    None
                };
                for (flag, heads) in step.requested.iter_mut().zip(&req) {
                    *flag |= heads.iter().any(|l| !l.is_empty());
                }
                let tiered = match self.host_requests(step, layer, &req)? {
                    Some(r) => Some(self.tiered_part(step, &q_rot, &r)?),
                    None => None,
                };
                (tiered, rebuilt)
            }
        };
        let paged = match (tiered, rebuilt) {
            (Some(a), Some(b)) => Some(ops::merge_partials(&a, &b)?),
            (a, b) => a.or(b),
        };
        let mut outs = Vec::with_capacity(step.entries.len());
        for e in &step.entries {
            let part = paged
                .as_ref()
                .map(|a| -> Result<AttentionPartial> {
                    Ok(AttentionPartial {
                        out: a.out.narrow(0, e.row, e.n)?,
                        lse: a.lse.narrow(0, e.row, e.n)?,
                    })
                })
                .transpose()?;
            let out = if e.n == 1 {
                match part {
                    Some(pt) => pt.out,
                    None => crate::invalid!(
                        "SparseKvCache::attend",
                        "decode token of sequence {} attended no page (algorithm {})",
                        e.seq,
                        self.algo.name()
                    ),
                }
            } else {
                let rows = |x: &Tensor| x.narrow(0, e.row, e.n);
                let own = ops::causal_self_attention(&rows(&q_rot)?, &rows(&k_rot)?, &rows(&v)?, self.scale)?;
                match part {
                    Some(pt) => ops::merge_partials(&pt, &own)?.out,
                    None => own.out,
                }
            };
            outs.push(out);
        }
        step.attended[layer] = true;
        let out = if outs.len() == 1 {
            outs.pop().unwrap_or_else(|| unreachable!())
        } else {
            Tensor::cat(&outs, 0)?
        };
        Ok(out.to_dtype(self.cfg.dtype)?)
    }
}

#[allow(dead_code)]
fn _assert_object_safe(_: &dyn SparseKvCache) {}
