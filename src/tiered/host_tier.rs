//! The capacity tier as the cache sees it: the home of every page with an id below
//! `host_pages`, `[slots, 2, P, D]` (ids past it have their homes in the fast tier).
//! On the CPU it is a tensor on the fast tier's device; with a CUDA fast tier it is a
//! [`PinnedPagePool`](crate::tiered::PinnedPagePool) in mapped page-locked host memory,
//! which kernels write (appends), gather from (misses) and attend over (pages the fast
//! tier could not place) directly, with no host synchronization.

use crate::ops::{self, AttentionPartial, PageList};
use crate::Result;
use candle_core::Tensor;

/// Home pages of every sequence (see the module docs).
#[derive(Debug)]
pub(crate) enum HostTier {
    /// A tensor pool on the same device as the fast tier (the CPU reference path).
    Tensor(Tensor),
    /// Mapped pinned host memory read and written by the GPU.
    #[cfg(feature = "cuda")]
    Pinned(crate::tiered::PinnedPagePool),
}

impl HostTier {
    /// Writes `k`, `v` `[T, Hkv, D]` rows to token destinations `dst` `[T, Hkv]` u32
    /// (`slot·P + offset`, `NONE` skips), all on the fast tier's device. Destinations in
    /// slots past this tier's (pages homed in the fast tier) are skipped.
    pub fn append(&mut self, k: &Tensor, v: &Tensor, dst: &Tensor) -> Result<()> {
        crate::fault::device_call("HostTier::append")?;
        match self {
            Self::Tensor(pool) => {
                // Ids past this tier's pages have their homes in the fast tier: nothing
                // of theirs is written here (the pinned pool's kernel skips them too).
                let limit = (pool.dims()[0] * pool.dims()[2]) as u32;
                let codes = dst.flatten_all()?.to_vec1::<u32>()?;
                if codes.iter().all(|&c| c == ops::NONE || c < limit) {
                    return ops::paged_append(pool, k, v, dst);
                }
                let own: Vec<u32> = codes
                    .into_iter()
                    .map(|c| if c < limit { c } else { ops::NONE })
                    .collect();
                ops::paged_append(pool, k, v, &Tensor::from_vec(own, dst.dims(), dst.device())?)
            }
            #[cfg(feature = "cuda")]
            Self::Pinned(pool) => pool.append_rows(k, v, dst),
        }
    }

    /// Copies the first `count[0]` rows of `pairs` `[cap, 2]` u32 (host slot, fast slot)
    /// into `fast` `[fast_slots, 2, P, D]`. With `side` (a forked side stream of the
    /// pinned tier's device), the copy is enqueued there
    /// (`PinnedPagePool::gather_counted_on` (feature `cuda`));
    /// the CPU tier copies in order and ignores it.
    pub fn gather_counted(
        &self,
        fast: &Tensor,
        pairs: &Tensor,
        count: &Tensor,
        side: Option<&crate::ops::SideStream>,
    ) -> Result<()> {
        crate::fault::device_call("HostTier::gather_counted")?;
        let _ = side;
        match self {
            Self::Tensor(pool) => {
                // CPU reference: the count is read where it lives (no device round trip).
                let n = count.to_vec1::<u32>()?.first().copied().unwrap_or(0) as usize;
                ops::copy_pages(fast, pool, &pairs.narrow(0, 0, n.min(pairs.dims()[0]))?.contiguous()?)
            }
            #[cfg(feature = "cuda")]
            Self::Pinned(pool) => match side {
                Some(side) => pool.gather_counted_on(fast, pairs, count, side),
                None => pool.gather_counted(fast, pairs, count),
            },
        }
    }

    /// Copies whole pages `pairs` `[n, 2]` u32 (host slot, destination slot) into `dst`
    /// `[slots, 2, P, D]` (a step-local pool).
    pub fn gather(&self, dst: &Tensor, pairs: &Tensor) -> Result<()> {
        crate::fault::device_call("HostTier::gather")?;
        match self {
            Self::Tensor(pool) => ops::copy_pages(dst, pool, pairs),
            #[cfg(feature = "cuda")]
            Self::Pinned(pool) => pool.gather_into(dst, pairs),
        }
    }

    /// `sparse_paged_attention` over pages read straight from this tier (`list.pages`
    /// holds host slots).
    pub fn attend(&self, q: &Tensor, list: &PageList, scale: f32) -> Result<AttentionPartial> {
        crate::fault::device_call("HostTier::attend")?;
        match self {
            Self::Tensor(pool) => ops::sparse_paged_attention(q, pool, list, scale),
            #[cfg(feature = "cuda")]
            Self::Pinned(pool) => pool.attend(q, list, scale),
        }
    }

    /// Whether [`attend_tiered`](Self::attend_tiered) takes the queries of `cfg`: always
    /// for a tensor tier (the fused kernel or its composed reference), for the pinned
    /// tier where a fused kernel fits.
    pub fn tiered_fits(&self, cfg: &crate::CacheConfig) -> bool {
        let _ = cfg;
        match self {
            Self::Tensor(_) => true,
            #[cfg(feature = "cuda")]
            Self::Pinned(_) => {
                ops::tiered_attention_fused(&cfg.device, cfg.dtype, cfg.head_dim, cfg.num_q_heads, cfg.num_kv_heads)
            }
        }
    }

    /// [`ops::tiered_paged_attention`] with this tier as the host pool: attends each entry
    /// of `list` from `fast` or (where `src` `[S, Hkv, N]` names a host slot) from this
    /// tier, and fills the entries that name both into `fast`.
    pub fn attend_tiered(
        &self,
        q: &Tensor,
        fast: &Tensor,
        list: &PageList,
        src: &Tensor,
        scale: f32,
    ) -> Result<AttentionPartial> {
        crate::fault::device_call("HostTier::attend_tiered")?;
        match self {
            Self::Tensor(pool) => ops::tiered_paged_attention(q, fast, pool, list, src, scale),
            #[cfg(feature = "cuda")]
            Self::Pinned(pool) => pool.attend_tiered(q, fast, list, src, scale),
        }
    }

    /// Allocates `slots` zeroed pages for `cfg` on the fast tier's device: pinned host
    /// memory when that device is a GPU.
    pub fn new(cfg: &crate::CacheConfig) -> Result<Self> {
        let (p, d) = (cfg.page_size, cfg.head_dim);
        #[cfg(feature = "cuda")]
        if cfg.device.is_cuda() {
            return Ok(Self::Pinned(crate::tiered::PinnedPagePool::new(
                &cfg.device,
                cfg.host_pages,
                p,
                d,
                cfg.dtype,
            )?));
        }
        Ok(Self::Tensor(Tensor::zeros(
            (cfg.host_pages, 2, p, d),
            cfg.dtype,
            &cfg.device,
        )?))
    }
}
