//! Cache configuration: model shape, page size, tier capacities, dtype and device.

use crate::pool::PageLayout;
use crate::{Error, Result};
use candle_core::{DType, Device};

/// Configuration of a [`SpinCache`](crate::SpinCache).
///
/// A *page* holds `page_size` tokens of K and V for one (sequence, layer, KV head):
/// `2 × page_size × head_dim` elements. Capacities count such pages.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Decoder layers that call [`attend`](crate::SparseKvCache::attend).
    pub num_layers: usize,
    /// Query heads `Hq`.
    pub num_q_heads: usize,
    /// KV heads `Hkv`; `Hq % Hkv == 0` (any GQA ratio, e.g. 3).
    pub num_kv_heads: usize,
    /// Head dimension `D` (even: rotary embedding rotates halves).
    pub head_dim: usize,
    /// Rotary embedding base θ (Llama 2: 1e4, SmolLM2: 1e5, Llama 3: 5e5).
    pub rope_theta: f64,
    /// Tokens per page: a power of two in `8..=128` (default 16).
    pub page_size: usize,
    /// Pages whose home is the capacity (host) tier.
    pub host_pages: usize,
    /// Pages of the fast (HBM) tier that cache host-tier pages; may be far smaller than
    /// `host_pages`.
    pub fast_pages: usize,
    /// Pages whose home is the fast tier (default 0): HBM slots beyond `fast_pages` that
    /// hold pages of their own, with no copy in the host tier, so the cache holds
    /// `host_pages + fast_home_pages` pages in all ([`total_pages`](Self::total_pages)).
    /// New pages take these slots first. See "Storage" in `docs/ARCHITECTURE.md`.
    pub fast_home_pages: usize,
    /// Ways per bucket of the fast tier's bucketed LRU (default 8, at most
    /// [`MAX_WAYS`](crate::tiered::device_lru::MAX_WAYS) = 32).
    pub lru_ways: usize,
    /// How fast-tier slots are shared among sequences (default:
    /// [`BudgetPolicy::DYNAMIC`], budgets that follow each sequence's reuse).
    pub budget_policy: BudgetPolicy,
    /// Longest sequence accepted, in tokens.
    pub max_seq_len: usize,
    /// Most sequences live at once (default 64): sizes the device page-table directory
    /// and the per-sequence LRU budget arrays.
    pub max_sequences: usize,
    /// Storage dtype of K/V (f32, f16 or bf16); attention accumulates in f32.
    pub dtype: DType,
    /// Device of the fast tier and of the tensors passed to `attend`.
    pub device: Device,
    /// `attend` rejects `q`, `k` or `v` holding a NaN or an infinity as invalid input
    /// (before anything is stored; the step stays usable). Off by default: the check
    /// reads the inputs back to the host, one synchronization per layer. Without it a
    /// non-finite key or value turns into NaN outputs; see "Non-finite inputs" in
    /// `docs/ARCHITECTURE.md` for how Dense and Quest differ then.
    pub reject_non_finite: bool,
    /// How a tiered step brings in the pages its fast tier misses ([`FetchMode`]).
    pub fetch_mode: FetchMode,
    /// Where a new page's slots go in the pools ([`PageLayout`]; default
    /// [`PageLayout::Interleaved`]). Outputs do not depend on it.
    pub page_layout: PageLayout,
}

/// How a tiered decode step reads the pages that are not in the fast tier
/// ([`CacheConfig::fetch_mode`]). Every mode gives the same outputs up to rounding and
/// leaves the same pages resident; `docs/BENCHMARKS.md` ("Fused miss fetch") measures
/// them against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FetchMode {
    /// Resolve, copy the misses into their fast slots (one gather launch), attend the
    /// fast tier, attend the pages that found no slot from the host tier, merge.
    InOrder,
    /// As `InOrder`, but the copy runs on a side stream while the pages resident before
    /// the round are attended; the fetched pages are attended after the join, and merged.
    /// It needs a device from [`ops::cuda_device`](crate::ops::cuda_device) (candle's
    /// `Device::new_cuda` tracks buffer uses with events; there, and on the CPU, steps
    /// run in order).
    SideStream,
    /// One attention launch reads every page where it is: hits from the fast tier,
    /// misses and pages with no slot from the host tier (mapped pinned memory), and writes
    /// each miss into its fast slot as it goes
    /// ([`ops::tiered_paged_attention`](crate::ops::tiered_paged_attention)). PCIe reads
    /// overlap HBM reads inside the kernel, with no copy launch, second attention or
    /// merge. Decode-only steps on CUDA with bf16/f16, head dim 64 or 128 and at most 16
    /// query heads per KV head use the fused kernel; steps with prefill chunks, and
    /// other shapes on CUDA, run `InOrder`; on the CPU the composed reference runs.
    #[default]
    InKernel,
}

impl CacheConfig {
    /// A configuration with defaults: CPU, f32, θ = 10000, page 16, 8 ways, dynamic
    /// per-sequence fast-tier budgets, room for 8192 tokens of one sequence in both tiers.
    pub fn new(num_layers: usize, num_q_heads: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        let mut c = Self {
            num_layers,
            num_q_heads,
            num_kv_heads,
            head_dim,
            rope_theta: 10_000.0,
            page_size: 16,
            host_pages: 0,
            fast_pages: 0,
            fast_home_pages: 0,
            lru_ways: 8,
            budget_policy: BudgetPolicy::DYNAMIC,
            max_seq_len: 8192,
            max_sequences: 64,
            dtype: DType::F32,
            device: Device::Cpu,
            reject_non_finite: false,
            fetch_mode: FetchMode::default(),
            page_layout: PageLayout::default(),
        };
        c = c.with_token_capacity(8192, 1.0);
        c
    }

    /// Pages the cache holds in all: `host_pages + fast_home_pages`.
    pub fn total_pages(&self) -> usize {
        self.host_pages + self.fast_home_pages
    }

    /// Whether the fast tier has room for every host page: the cache then maps it
    /// directly (every page has its own fast slot, numbered as its host slot; no
    /// replacement, no fetch).
    pub fn fast_tier_holds_every_page(&self) -> bool {
        self.fast_pages >= self.host_pages
    }

    /// Moves `fraction` of the pages (of [`total_pages`](Self::total_pages), rounded
    /// down) to homes in the fast tier, keeping the total, and sizes the fast tier's
    /// cache of the rest to `cache_fraction` of the pages left in the host tier (at least
    /// one LRU bucket). For example, `with_fast_homes(0.5, 0.1)` on a cache of 1000 pages
    /// gives 500 pages homed in HBM, 500 in pinned host memory and 50 HBM pages caching
    /// those (48 in use: the cache is whole buckets of `lru_ways`). Give the cache more
    /// than the share of pages one decode step selects (a sparse budget of 2048 tokens at
    /// 32K context is 1/16): below it every step misses most of its pages (see
    /// `docs/BENCHMARKS.md`).
    pub fn with_fast_homes(mut self, fraction: f64, cache_fraction: f64) -> Self {
        let total = self.total_pages();
        self.fast_home_pages = (total as f64 * fraction.clamp(0.0, 1.0)).floor() as usize;
        // At least one host page: the host tier is never empty.
        self.fast_home_pages = self.fast_home_pages.min(total.saturating_sub(1));
        self.host_pages = total - self.fast_home_pages;
        self.fast_pages = self.cache_pages(cache_fraction);
        self
    }

    /// Fast-tier cache pages for `fraction` of the host tier: rounded up, at least one
    /// LRU bucket.
    fn cache_pages(&self, fraction: f64) -> usize {
        let fast = (self.host_pages as f64 * fraction.clamp(0.0, 1.0)).ceil() as usize;
        fast.max(self.lru_ways)
    }

    /// Pages needed to hold `tokens` tokens of one sequence (all layers and KV heads).
    pub fn pages_for_tokens(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_size.max(1)) * self.num_layers * self.num_kv_heads
    }

    /// Sizes the host tier for `tokens` tokens (summed over sequences, rounded up to whole
    /// pages per sequence) and the fast tier to `fast_fraction` of it (at least one LRU
    /// bucket). Every page's home is then the host tier (`fast_home_pages` = 0; see
    /// [`with_fast_homes`](Self::with_fast_homes)).
    pub fn with_token_capacity(mut self, tokens: usize, fast_fraction: f64) -> Self {
        self.host_pages = self.pages_for_tokens(tokens);
        self.fast_home_pages = 0;
        self.fast_pages = self.cache_pages(fast_fraction);
        self
    }

    /// Changes the page size, keeping the token capacity of both tiers (page counts are
    /// recomputed and round up).
    pub fn with_page_size(mut self, page_size: usize) -> Self {
        // `host_pages` counts pages of every (layer, KV head): tokens = pages per
        // directory × page size.
        let dirs = (self.num_layers * self.num_kv_heads).max(1);
        let tokens = self.host_pages.div_ceil(dirs) * self.page_size;
        let fraction = if self.host_pages == 0 {
            1.0
        } else {
            self.fast_pages as f64 / self.host_pages as f64
        };
        let home_tokens = self.fast_home_pages.div_ceil(dirs) * self.page_size;
        self.page_size = page_size;
        let mut c = self.with_token_capacity(tokens, fraction);
        c.fast_home_pages = c.pages_for_tokens(home_tokens);
        c
    }

    /// Bytes of one page (K and V) in `dtype`.
    pub fn page_bytes(&self) -> usize {
        2 * self.page_size * self.head_dim * self.dtype.size_in_bytes()
    }

    /// Checks every field; the error names the field and the constraint.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.num_layers == 0 || self.num_q_heads == 0 || self.num_kv_heads == 0 {
            return bad(format!(
                "num_layers ({}), num_q_heads ({}) and num_kv_heads ({}) must be >= 1",
                self.num_layers, self.num_q_heads, self.num_kv_heads
            ));
        }
        if self.num_q_heads % self.num_kv_heads != 0 {
            return bad(format!(
                "num_q_heads ({}) must be a multiple of num_kv_heads ({})",
                self.num_q_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return bad(format!("head_dim ({}) must be even and >= 2", self.head_dim));
        }
        if !self.page_size.is_power_of_two() || !(8..=128).contains(&self.page_size) {
            return bad(format!(
                "page_size ({}) must be a power of two in 8..=128",
                self.page_size
            ));
        }
        if self.lru_ways == 0 || self.lru_ways > crate::tiered::device_lru::MAX_WAYS {
            return bad(format!(
                "lru_ways ({}) must be in 1..={}",
                self.lru_ways,
                crate::tiered::device_lru::MAX_WAYS
            ));
        }
        if self.host_pages == 0 || self.host_pages >= u32::MAX as usize / self.page_size {
            return bad(format!(
                "host_pages ({}) must be in 1..{}",
                self.host_pages,
                u32::MAX as usize / self.page_size
            ));
        }
        let dirs = self.num_layers * self.num_kv_heads;
        if self.page_layout == PageLayout::ByDirectory && self.host_pages < dirs {
            return bad(format!(
                "host_pages ({}) must be >= layers × KV heads ({dirs}) with PageLayout::ByDirectory: each \
                 directory needs a page of the host tier's",
                self.host_pages
            ));
        }
        if self.total_pages() >= u32::MAX as usize / self.page_size
            || self.fast_pages + self.fast_home_pages >= u32::MAX as usize / self.page_size
        {
            return bad(format!(
                "host_pages ({}) + fast_home_pages ({}) and fast_pages ({}) + fast_home_pages must each be < {}",
                self.host_pages,
                self.fast_home_pages,
                self.fast_pages,
                u32::MAX as usize / self.page_size
            ));
        }
        if self.fast_pages < self.lru_ways || self.fast_pages >= u32::MAX as usize / self.page_size {
            return bad(format!(
                "fast_pages ({}) must be >= lru_ways ({})",
                self.fast_pages, self.lru_ways
            ));
        }
        if self.max_seq_len == 0 || self.max_seq_len >= u32::MAX as usize {
            return bad(format!("max_seq_len ({}) must be in 1..2^32-1", self.max_seq_len));
        }
        if self.max_sequences == 0 || self.max_sequences >= u32::MAX as usize {
            return bad(format!("max_sequences ({}) must be in 1..2^32-1", self.max_sequences));
        }
        if !matches!(self.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return bad(format!("dtype {:?} unsupported: use f32, f16 or bf16", self.dtype));
        }
        for (name, pages) in [
            ("host_pages", self.host_pages),
            ("fast_pages + fast_home_pages", self.fast_pages + self.fast_home_pages),
        ] {
            let (p, d, e) = (self.page_size, self.head_dim, self.dtype.size_in_bytes());
            if crate::ops::util::pool_bytes(pages, p, d, e).is_none() {
                return bad(format!(
                    "{name} ({pages}) pages of [2, {p}, {d}] {:?} overflow the size of one allocation",
                    self.dtype
                ));
            }
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return bad(format!("rope_theta ({}) must be > 0", self.rope_theta));
        }
        Ok(())
    }
}

/// How fast-tier slots are shared among requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetPolicy {
    /// No budgets: plain bucketed LRU.
    Unlimited,
    /// Every active request gets `capacity / active` slots.
    FixedEqual,
    /// Budgets follow each request's short-distance reuse (water-filling), never below
    /// `floor_pages`.
    Dynamic {
        /// Steps over which the per-step reuse counts are averaged.
        window_steps: u64,
        /// Largest reuse distance (in steps) that counts as reuse.
        reuse_steps: u64,
        /// Minimum budget of an active request.
        floor_pages: usize,
    },
}

impl BudgetPolicy {
    /// The default dynamic policy: 16-step average, reuse within 2 steps, floor 8 pages.
    pub const DYNAMIC: Self = Self::Dynamic {
        window_steps: 16,
        reuse_steps: 2,
        floor_pages: 8,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_page_size_keeps_the_token_capacity() {
        // 2 layers × 4 KV heads: page counts include that factor of 8.
        let c = CacheConfig::new(2, 8, 4, 64).with_token_capacity(1000, 0.25);
        assert_eq!(c.host_pages, 1000usize.div_ceil(16) * 8);
        let c8 = c.clone().with_page_size(8);
        // 63 pages of 16 tokens per directory = 1008 tokens = 126 pages of 8.
        assert_eq!(c8.host_pages, 126 * 8);
        assert_eq!(
            c8.fast_pages,
            (126.0 * 8.0 * (c.fast_pages as f64 / c.host_pages as f64)).ceil() as usize
        );
        let back = c8.with_page_size(16);
        assert_eq!(back.host_pages, c.host_pages);
    }

    #[test]
    fn with_fast_homes_splits_the_total_and_survives_a_page_size_change() {
        // 1 layer × 1 KV head, 1000 tokens = 63 pages of 16.
        let c = CacheConfig::new(1, 2, 1, 64).with_token_capacity(1000, 1.0);
        let h = c.clone().with_fast_homes(0.5, 0.25);
        assert_eq!((h.fast_home_pages, h.host_pages, h.total_pages()), (31, 32, 63));
        assert_eq!(h.fast_pages, 8, "a quarter of 32 host pages");
        h.validate().unwrap();
        // All homes asked for: one page stays in the host tier.
        let all = c.clone().with_fast_homes(1.0, 0.1);
        assert_eq!((all.fast_home_pages, all.host_pages), (62, 1));
        // 31 pages of 16 = 496 tokens of homes = 62 pages of 8.
        let h8 = h.clone().with_page_size(8);
        assert_eq!((h8.fast_home_pages, h8.host_pages), (62, 64));
        // with_token_capacity sizes the host tier alone again.
        assert_eq!(h8.with_token_capacity(1000, 1.0).fast_home_pages, 0);
        let mut big = h;
        big.fast_home_pages = u32::MAX as usize / 16;
        let err = big.validate().unwrap_err().to_string();
        assert!(err.contains("fast_home_pages"), "{err}");
    }
}
