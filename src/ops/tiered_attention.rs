//! Tiered sparse paged attention: one call attends each entry's page from the fast tier
//! or, for the pages the fast tier does not hold, straight from the host tier, and copies
//! the host pages that have a fast slot into it on the way (the misses' fill). On CUDA
//! (bf16/f16, head dim 64 or 128, at most 16 query heads per KV head) this is one launch
//! of the `spa_tier_*` kernels: PCIe reads of the misses overlap the HBM reads of the
//! hits inside the kernel, with no separate fetch, spill attention or merge. Elsewhere
//! [`tiered_paged_attention`] composes the same result from [`copy_pages`](super::copy_pages)
//! (every entry's page into a step-local pool, then the fills) and one
//! [`sparse_paged_attention`]: that composition is the reference the fused kernel is
//! tested against.

use super::attention::{check_pool_and_list, empty_partial};
use super::{sparse_paged_attention, util, AttentionPartial, PageList, NONE};
use crate::Result;
use candle_core::{DType, Tensor};

const OP: &str = "tiered_paged_attention";

/// Whether [`tiered_paged_attention`] runs as one fused kernel for queries of `dtype`
/// with `q_heads` heads of `head_dim` over `kv_heads` KV heads on `device`: a CUDA device,
/// bf16/f16, head dim 64 or 128, a GQA group of at most 16. Otherwise it composes page
/// copies and one attention, reading the list on the host.
pub fn tiered_attention_fused(
    device: &candle_core::Device,
    dtype: DType,
    head_dim: usize,
    q_heads: usize,
    kv_heads: usize,
) -> bool {
    #[cfg(feature = "cuda")]
    if device.is_cuda() && kv_heads > 0 && q_heads % kv_heads == 0 {
        return super::cuda::attention::mma_kernel_fits(dtype, head_dim, q_heads / kv_heads);
    }
    let _ = (device, dtype, head_dim, q_heads, kv_heads);
    false
}

/// [`tiered_attention_fused`] for `q` `[T, Hq, D]` over `kv_heads`.
#[cfg(feature = "cuda")]
pub(crate) fn fused_fits(q: &Tensor, kv_heads: usize) -> bool {
    q.dims3()
        .is_ok_and(|(_, hq, d)| tiered_attention_fused(q.device(), q.dtype(), d, hq, kv_heads))
}

/// Attention of each query token over its sequence's pages, each read from the fast
/// tier or the host tier, with the fill of the host pages that have a fast slot.
///
/// # Arguments
/// * `q` — `[T, Hq, D]` post-RoPE queries (f32, f16 or bf16).
/// * `fast` — `[fast_slots, 2, P, D]` fast-tier pages, same dtype. **Written**: after the
///   call, `fast[slot]` equals `host[src]` for every entry that names both.
/// * `host` — `[host_slots, 2, P, D]` host-tier pages, same dtype and device.
/// * `list` — `pages` `[S, Hkv, N, 2]` (fast slot or [`NONE`], logical page), query
///   placement `[T, 2]`, key limits `[S]`, as for [`sparse_paged_attention`].
/// * `src` — `[S, Hkv, N]` u32: the host slot an entry's page is read from, or [`NONE`]
///   (read its fast slot). An entry with both a host slot and a fast slot is a fill.
/// * `scale` — score scale, usually `1/sqrt(D)`.
///
/// A fast slot that is filled must not be read or filled by any other entry of the call
/// (the device LRU guarantees this: it pins a slot for the one request it fetches for).
/// The CPU checks this and fails; the CUDA kernel does not.
///
/// Returns the partial state `out` `[T, Hq, D]` f32, `lse` `[T, Hq]` f32.
pub fn tiered_paged_attention(
    q: &Tensor,
    fast: &Tensor,
    host: &Tensor,
    list: &PageList,
    src: &Tensor,
    scale: f32,
) -> Result<AttentionPartial> {
    let d = check(q, fast, list, src)?;
    util::check_shape(
        OP,
        "host",
        host,
        &[None, Some(2), Some(fast.dims()[2]), Some(d)],
        &format!("[host_slots, 2, {}, {d}] (the fast pool's page shape)", fast.dims()[2]),
    )?;
    util::check_same_dtype(OP, ("q", q), ("host", host))?;
    util::check_device(OP, fast.device(), &[("host", host)])?;
    util::check_contiguous(OP, &[("host", host)])?;
    if q.dims()[0] == 0 {
        return empty_partial(q);
    }
    #[cfg(feature = "cuda")]
    if fused_fits(q, list.pages.dims()[1]) {
        let (hs, _, p, _) = host.dims4()?;
        let host_ref = {
            let ptr = super::cuda::field_ptr_of(OP, "host", host, host.dtype())?;
            super::cuda::attention::PoolRef {
                ptr,
                slots: hs,
                page_size: p,
                head_dim: d,
            }
        };
        return fused(q, fast, host_ref, list, src, scale);
    }
    reference(q, fast, host, list, src, scale)
}

/// Validates everything but the host pool; returns the head dim.
pub(crate) fn check(q: &Tensor, fast: &Tensor, list: &PageList, src: &Tensor) -> Result<usize> {
    check_pool_and_list(OP, q, ("fast", fast), list)?;
    let d = q.dims()[2];
    let (s, hkv, n, _) = list.pages.dims4()?;
    util::check_shape(
        OP,
        "src",
        src,
        &[Some(s), Some(hkv), Some(n)],
        &format!("[{s}, {hkv}, {n}]"),
    )?;
    util::check_dtype(OP, "src", src, &[DType::U32])?;
    util::check_device(OP, fast.device(), &[("src", src)])?;
    util::check_contiguous(OP, &[("src", src)])?;
    Ok(d)
}

/// The composition: every entry's page gathered from its pool into a step-local pool
/// (entry `e` at slot `e`), one attention over it (so the result does not depend on
/// which tier held a page, as in the fused kernel), then the fills. Reads `list.pages`
/// and `src` on the host.
fn reference(
    q: &Tensor,
    fast: &Tensor,
    host: &Tensor,
    list: &PageList,
    src: &Tensor,
    scale: f32,
) -> Result<AttentionPartial> {
    let dims = list.pages.dims().to_vec();
    let pages = list.pages.flatten_all()?.to_vec1::<u32>()?;
    let srcs = src.flatten_all()?.to_vec1::<u32>()?;
    let (mut fills, mut from_fast, mut from_host) = (Vec::new(), Vec::new(), Vec::new());
    let mut local = pages.clone();
    let mut filled = std::collections::HashSet::new();
    for (e, &hs) in srcs.iter().enumerate() {
        let slot = pages[2 * e];
        let at = e as u32;
        if hs != NONE {
            from_host.extend([hs, at]);
            if slot != NONE {
                if !filled.insert(slot) {
                    crate::invalid!(OP, "fast slot {slot} is filled by two entries (pages {:?})", dims);
                }
                fills.extend([hs, slot]);
            }
            local[2 * e] = at;
        } else if slot != NONE {
            from_fast.extend([slot, at]);
            local[2 * e] = at;
        }
    }
    if let Some(e) = (0..srcs.len()).find(|&e| srcs[e] == NONE && filled.contains(&pages[2 * e])) {
        crate::invalid!(
            OP,
            "fast slot {} is read by entry {e} and filled in the same call (pages {:?})",
            pages[2 * e],
            dims
        );
    }
    let dev = fast.device();
    let pairs = |v: Vec<u32>| -> Result<Tensor> {
        let n = v.len() / 2;
        Ok(Tensor::from_vec(v, (n, 2), dev)?)
    };
    let (_, _, p, d) = fast.dims4()?;
    let step_pool = Tensor::zeros((srcs.len().max(1), 2, p, d), fast.dtype(), dev)?;
    super::copy_pages(&step_pool, fast, &pairs(from_fast)?)?;
    super::copy_pages(&step_pool, host, &pairs(from_host)?)?;
    let part = sparse_paged_attention(
        q,
        &step_pool,
        &PageList {
            pages: Tensor::from_vec(local, dims.as_slice(), dev)?,
            queries: list.queries.clone(),
            kv_limit: list.kv_limit.clone(),
        },
        scale,
    )?;
    super::copy_pages(fast, host, &pairs(fills)?)?;
    Ok(part)
}

/// The fused kernel over `fast` (written in place) and the host pool at `host`.
#[cfg(feature = "cuda")]
pub(crate) fn fused(
    q: &Tensor,
    fast: &Tensor,
    host: super::cuda::attention::PoolRef,
    list: &PageList,
    src: &Tensor,
    scale: f32,
) -> Result<AttentionPartial> {
    use candle_core::{CudaStorage, Layout, Storage};
    struct Fused {
        host: super::cuda::attention::PoolRef,
        list: PageList,
        src: Tensor,
        scale: f32,
        out: std::sync::Mutex<Option<(CudaStorage, candle_core::Shape)>>,
    }
    impl candle_core::InplaceOp2 for Fused {
        fn name(&self) -> &'static str {
            OP
        }
        fn cpu_fwd(
            &self,
            _: &mut candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<()> {
            candle_core::bail!("{OP}: the fused kernel runs on CUDA only")
        }
        fn cuda_fwd(
            &self,
            fast: &mut CudaStorage,
            fl: &Layout,
            q: &CudaStorage,
            ql: &Layout,
        ) -> candle_core::Result<()> {
            let fast = super::cuda::attention::PoolRef {
                ptr: super::cuda::ptr_mut(OP, fast, fl)?,
                slots: fl.shape().dims()[0],
                page_size: self.host.page_size,
                head_dim: self.host.head_dim,
            };
            let r = super::cuda::attention::tiered_paged_attention(
                q, ql, fast, self.host, &self.list, &self.src, self.scale,
            )?;
            *self
                .out
                .lock()
                .map_err(|_| candle_core::Error::Msg(format!("{OP}: poisoned lock")))? = Some(r);
            Ok(())
        }
    }
    let (t, hq, d) = q.dims3()?;
    let op = Fused {
        host,
        list: list.clone(),
        src: src.clone(),
        scale,
        out: std::sync::Mutex::new(None),
    };
    fast.inplace_op2(q, &op)?;
    let taken = op.out.lock().ok().and_then(|mut o| o.take());
    let Some((storage, shape)) = taken else {
        crate::invalid!(OP, "the kernel left no output (q {:?})", q.dims());
    };
    let packed = Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    );
    super::attention::unpack(&packed, t, hq, d)
}
