//! The public face: the [`SparseKvCache`] trait that model code calls once per layer per
//! step, and [`SpinCache`], which composes the tiered page pool, the two-level page
//! tables, a [`SparseAlgorithm`] and the ops.
//!
//! Files by phase: `types` (the trait and public types), `lifecycle` (the trait's
//! implementation: sequences and the step lifecycle), `requests` (page requests and new
//! token destinations), `attend` (one layer: checks, append, select, tiered attention),
//! `rebuilt` (the rebuilt part), `plan` (per-step facts shared by the layers), `padded`
//! (fixed-shape decode steps for CUDA graphs); this file holds the cache's state and
//! construction.

mod attend;
mod fanout;
mod lifecycle;
mod padded;
mod plan;
mod rebuilt;
mod requests;
mod types;

pub use fanout::{AttendTap, FanOut};
pub use types::{PaddedShape, PoolUsage, SelectionRecord, SeqId, SparseKvCache, StepInput, StepStats};

use crate::config::{CacheConfig, FetchMode};
use crate::error::Tier;
use crate::meta::{DeviceTables, PageTables, LEAF_PAGES};
use crate::ops::{self, AttentionPartial, PageList, NONE};
use crate::partition::{
    DeviceRebuilt, IndexInput, MaterializeInput, Materialized, RebuiltKeys, SelectInput, Selection, SparseAlgorithm,
    TokenRun,
};
use crate::pool::{BudgetPolicy, BudgetTracker, PageSlots};
use crate::rope::rope_tables;
use crate::tiered::{DeviceLru, HostTier, ResolveRequest};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use foldhash::{HashMap, HashMapExt};

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
    /// Facts shared by all layers, computed once (see [`plan`]).
    plan: plan::StepPlan,
    /// Per entry: whether it asked for any page this step (its reuse then counts
    /// towards its fast-tier budget, as the simulator counts it).
    requested: Vec<bool>,
    stats: StepStats,
    /// Set when an `attend` (or `abort_step`) failed past its input validation: the step
    /// is poisoned and only `abort_step` may follow (the message says where it failed).
    failed: Option<String>,
    /// The shape of a padded decode step (see [`padded`]); `None` for an ordinary step.
    padded: Option<PaddedShape>,
    /// LRU rounds and page requests this step's `attend` calls ran (a replay of a padded
    /// step of the same shape runs as many).
    rounds: u32,
    requests: u64,
    /// Set when the step's prefill chunks take the tensor-core prefill attention.
    prefill: Option<PrefillPlan>,
    /// A padded step whose staged words are still to be copied to the device and
    /// expanded into its plan and RoPE tables: `prepare_padded_step` or the step's first
    /// `attend` does it, so that a graph captured over the step holds that work too (see
    /// [`padded`]).
    padded_prep: Option<crate::ops::decode_plan::PlanWords>,
}

/// The prefill chunks of a step on the tensor-core path, computed once in `begin_step`.
#[derive(Debug)]
struct PrefillPlan {
    tiles: ops::PrefillTiles,
    /// `[T, 2]` like `StepState::queries`, with the chunks' rows naming no sequence
    /// (`NONE`): the paged decode kernel leaves them empty.
    decode_queries: Tensor,
    /// `[S, Hkv, 0, 2]`: the page lists of a layer that requested no page.
    no_pages: Tensor,
}

/// Where a layer's page requests were built.
enum Requests {
    /// On the host: per entry, per KV head, logical pages (ascending).
    Lists(Vec<Vec<Vec<u32>>>),
    /// A decode-only step's selection `[S, Hkv, K]` logical pages, left on the device,
    /// with their host slots when already looked up (every page: the candidates).
    Device(Tensor, Option<Tensor>),
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
    host_alloc: PageSlots,
    lru: DeviceLru,
    /// The stream misses are fetched on while resident pages are attended
    /// (`FetchMode::SideStream` on a device that allows it; see [`ops::SideStream`]).
    side: Option<ops::SideStream>,
    /// Decode-only tiered steps read misses inside the attention kernel
    /// (`FetchMode::InKernel` where the host tier takes it).
    in_kernel: bool,
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
    /// Device inputs of padded decode steps, per shape, and their upload (see [`padded`]).
    padded: padded::Padded,
    /// `[layers]` f32 pages rebuilt on the device per layer in the open step (added to
    /// in place, so that captured steps count too; read and zeroed by `end_step`), and
    /// whether any step rebuilt on the device yet.
    rebuilt_counts: Tensor,
    device_rebuilds: bool,
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

/// `r`, with a device error turned into [`Error::Alloc`] naming `what` (the part of the
/// cache being allocated, with its size). With the `fault-injection` feature the hook can
/// fail a stage that succeeded, as the device would have.
fn allocating<T>(r: Result<T>, what: impl FnOnce() -> String) -> Result<T> {
    const OP: &str = "SpinCache::new";
    r.and_then(|v| crate::fault::device_call(OP).map(|()| v))
        .map_err(|e| match e {
            Error::Candle(source) => Error::Alloc {
                op: OP,
                what: what(),
                source: Box::new(source),
            },
            e => e,
        })
}

/// `"{what}: N pages of [2, P, D] dtype (X GiB)"`.
fn pages_of(what: &str, pages: usize, cfg: &CacheConfig) -> String {
    let gib = (pages as f64) * (cfg.page_bytes() as f64) / (1u64 << 30) as f64;
    format!(
        "{what}: {pages} pages of [2, {}, {}] {:?} ({gib:.2} GiB)",
        cfg.page_size, cfg.head_dim, cfg.dtype
    )
}

impl SpinCache {
    /// Builds a cache; validates `cfg` and the algorithm against it.
    pub fn new(cfg: CacheConfig, algo: impl SparseAlgorithm + 'static) -> Result<Self> {
        Self::new_boxed(cfg, Box::new(algo))
    }

    /// [`SpinCache::new`] with an already boxed algorithm (chosen at run time).
    pub fn new_boxed(cfg: CacheConfig, mut algo: Box<dyn SparseAlgorithm>) -> Result<Self> {
        cfg.validate()?;
        allocating(algo.init(&cfg), || format!("the metadata of {}", algo.name()))?;
        let (p, d) = (cfg.page_size, cfg.head_dim);
        // A fast tier with room for every host page is direct-mapped: no replacement
        // (the fast homes then are direct-mapped ids too). Otherwise ids past the host
        // tier's have their homes in fast slots after the buckets'.
        let lru = allocating(
            if cfg.fast_tier_holds_every_page() {
                DeviceLru::direct(cfg.max_sequences, cfg.total_pages(), &cfg.device)
            } else {
                let buckets = cfg.fast_pages / cfg.lru_ways;
                DeviceLru::new(buckets, cfg.lru_ways, cfg.max_sequences, cfg.host_pages, &cfg.device)
                    .and_then(|l| l.with_fast_homes(cfg.fast_home_pages))
            },
            || "the fast tier's LRU tables".into(),
        )?;
        let fast_pool = allocating(
            Tensor::zeros((lru.fast_slots(), 2, p, d), cfg.dtype, &cfg.device).map_err(Error::from),
            || {
                let what = format!("the fast tier on {:?}", cfg.device);
                pages_of(&what, lru.fast_slots(), &cfg)
            },
        )?;
        let dirs = cfg.num_layers * cfg.num_kv_heads;
        let max_rows = cfg.max_sequences * dirs;
        let leaves_per_row = cfg.max_seq_len.div_ceil(p).div_ceil(LEAF_PAGES);
        let arena = cfg.total_pages().div_ceil(LEAF_PAGES) + max_rows;
        let host = allocating(HostTier::new(&cfg), || {
            let pinned = if cfg.device.is_cuda() { ", pinned" } else { "" };
            pages_of(&format!("the host tier{pinned}"), cfg.host_pages, &cfg)
        })?;
        let device_tables = allocating(
            DeviceTables::with_capacity(max_rows, leaves_per_row, arena, dirs, &cfg.device),
            || format!("the device page tables ({max_rows} rows, {arena} leaves)"),
        )?;
        let in_kernel = cfg.fetch_mode == FetchMode::InKernel && !lru.is_direct() && host.tiered_fits(&cfg);
        let (cfg_layers, cfg_device) = (cfg.num_layers, cfg.device.clone());
        let mut cache = Self {
            id: types::NEXT_CACHE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            host,
            // Pages take fast homes (ids from host_pages on) first.
            host_alloc: PageSlots::new(cfg.page_layout, cfg.total_pages(), cfg.host_pages, dirs),
            budgets: BudgetTracker::new(cfg.budget_policy, lru.capacity()),
            // A direct-mapped fast tier never fetches.
            side: if cfg.fetch_mode == FetchMode::SideStream && !lru.is_direct() {
                ops::SideStream::new(&cfg.device)?
            } else {
                None
            },
            in_kernel,
            lru,
            tables: {
                let mut t = PageTables::new(cfg.num_layers, cfg.num_kv_heads);
                t.reserve_leaves(arena);
                t
            },
            device_tables,
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
            padded: padded::Padded::default(),
            rebuilt_counts: Tensor::zeros(cfg_layers, DType::F32, &cfg_device)?,
            device_rebuilds: false,
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

    /// How this cache's tiered decode steps read their misses: the configured
    /// [`CacheConfig::fetch_mode`] where the device and shapes allow it, else
    /// [`FetchMode::InOrder`] (also for a fast tier that holds every page: it never
    /// fetches).
    pub fn fetch_mode(&self) -> FetchMode {
        if self.side.is_some() {
            FetchMode::SideStream
        } else if self.in_kernel {
            FetchMode::InKernel
        } else {
            FetchMode::InOrder
        }
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
            if pages < len.div_ceil(self.cfg.page_size) || pages > self.cfg.max_seq_len.div_ceil(self.cfg.page_size) {
                return bad(format!(
                    "sequence {seq}: {len} tokens but {pages} pages (max_seq_len {})",
                    self.cfg.max_seq_len
                ));
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
    fn abort_device_work(&mut self, entries: &[StepEntry], clear_fast_tier: bool) -> Result<()> {
        let mut slots = Vec::new();
        for e in entries {
            slots.extend(self.step_slots(e)?);
        }
        // Per-page key bounds of the pages the step wrote into but does not own.
        self.restore_page_minmax(entries)?;
        // The step's counters are dropped; the recency it gave to pages stays (harmless:
        // residency never changes an output).
        self.lru.take_step_counters()?;
        if self.device_rebuilds {
            self.rebuilt_counts.zero_set()?;
        }
        // Drop the new pages' fast copies, or all of them (last: the one change
        // `pool_usage` shows).
        if clear_fast_tier {
            self.lru.clear()
        } else {
            self.lru.invalidate(&slots)
        }
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

    /// Copies whole pages into `dst` `[n, 2, P, D]`: `pairs` holds (page id, destination
    /// slot) pairs, flattened. Each page is read where it always lives: its fixed fast
    /// slot ([`DeviceLru::fixed_slot`]: a fast home, or any id of a direct-mapped tier),
    /// else its home in the host tier. Returns how many pages came from the host tier.
    pub(super) fn gather_homes(&self, dst: &Tensor, pairs: &[u32]) -> Result<usize> {
        let (mut host, mut fast) = (Vec::new(), Vec::new());
        for pair in pairs.chunks_exact(2) {
            match self.lru.fixed_slot(pair[0]) {
                Some(f) => fast.extend([f, pair[1]]),
                None => host.extend_from_slice(pair),
            }
        }
        let dev = dst.device();
        let from_host = host.len() / 2;
        if from_host > 0 {
            self.host.gather(dst, &Tensor::from_vec(host, (from_host, 2), dev)?)?;
        }
        if !fast.is_empty() {
            let n = fast.len() / 2;
            ops::copy_pages(dst, &self.fast_pool, &Tensor::from_vec(fast, (n, 2), dev)?)?;
        }
        Ok(from_host)
    }

    /// Recomputes the per-page key bounds ([`SparseAlgorithm::page_minmax`], Quest's
    /// min/max) of every page that held tokens before the step and received the step's
    /// tokens too: from the keys its home holds for its first `start % P` rows, in
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
            self.gather_homes(&pages, &pairs)?;
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
}

#[allow(dead_code)]
fn _assert_object_safe(_: &dyn SparseKvCache) {}
