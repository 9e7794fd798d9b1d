//! Launch glue for `kernels/tier_copy.cu`: batched page copy between two pools on one GPU
//! (used by [`copy_pages`](crate::ops::copy_pages)), its variant with the pair count on
//! the device (used by [`PinnedPagePool::gather_counted`](super::PinnedPagePool::gather_counted)), and [`selection_to_pages`], which
//! turns a top-k selection into an attention page list without leaving the GPU.

use super::{alloc, cfg, func, launch, ptr, ptr_mut, word_bytes, TIER_COPY};
use crate::ops::NONE;
use crate::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, Tensor};

const OP_COPY: &str = "copy_pages";
const OP_SEL: &str = "selection_to_pages";

/// `dst[pairs[i, 1]] = src[pairs[i, 0]]` for whole pages, one block per pair.
pub(crate) fn copy_pages(
    dst: &mut CudaStorage,
    dl: &Layout,
    src: &CudaStorage,
    sl: &Layout,
    pairs: &Tensor,
) -> candle_core::Result<()> {
    let sp = ptr(OP_COPY, src, sl)?;
    copy_pages_from(dst, dl, sp, sl.dims()[0], pairs)
}

/// [`copy_pages`] from any device-readable address `src` holding `src_slots` pages of the
/// destination's page shape (a fast-tier pool, or mapped pinned host memory: the gather
/// then reads over PCIe, one launch for all pages).
pub(crate) fn copy_pages_from(
    dst: &mut CudaStorage,
    dl: &Layout,
    sp: u64,
    src_slots: usize,
    pairs: &Tensor,
) -> candle_core::Result<()> {
    let n = pairs.dims().first().copied().unwrap_or(0);
    if n == 0 {
        return Ok(());
    }
    let nd = dl.dims()[0];
    let page_elems: usize = dl.dims()[1..].iter().product();
    let row_bytes = page_elems * dst.dtype().size_in_bytes();
    let dev = super::device(dst).clone();
    let dp = ptr_mut(OP_COPY, dst, dl)?;
    let pp = super::field_ptr(OP_COPY, "pairs", pairs)?;
    let w = word_bytes(row_bytes, &[dp, sp]);
    let name = match w {
        16 => "copy_pages_w16",
        4 => "copy_pages_w4",
        _ => "copy_pages_w2",
    };
    let f = func(&dev, &TIER_COPY, name)?;
    let words = row_bytes / w;
    let threads = (words.next_power_of_two().clamp(32, 256)) as u32;
    launch!(
        f,
        cfg((n as u32).min(65535), threads, 0),
        dp,
        sp,
        pp,
        n as i32,
        words as i32,
        nd as u32,
        src_slots as u32
    )
}

/// Most blocks of a counted copy on the device's stream (they stride over the pairs).
const COUNTED_MAX_BLOCKS: u32 = 1024;

/// [`copy_pages_from`] over the first `*count` rows of `pairs` `[cap, 2]`, the count read
/// by the kernel from `count` `[1]` u32 on the device (the grid depends on `cap` only, so
/// nothing is read back to the host). Launched on `stream` when given (a side stream of
/// the device, see [`crate::ops::SideStream`]), else on the device's stream.
pub(crate) fn copy_pages_counted_from(
    dst: &mut CudaStorage,
    dl: &Layout,
    sp: u64,
    src_slots: usize,
    pairs: &Tensor,
    count: &Tensor,
    stream: Option<&std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>>,
) -> candle_core::Result<()> {
    let cap = pairs.dims().first().copied().unwrap_or(0);
    if cap == 0 {
        return Ok(());
    }
    if cap > i32::MAX as usize {
        candle_core::bail!("{OP_COPY}: {cap} pair rows exceed the launch limit");
    }
    let nd = dl.dims()[0];
    let page_elems: usize = dl.dims()[1..].iter().product();
    let row_bytes = page_elems * dst.dtype().size_in_bytes();
    let dev = super::device(dst).clone();
    let dp = ptr_mut(OP_COPY, dst, dl)?;
    let pp = super::field_ptr(OP_COPY, "pairs", pairs)?;
    let cp = super::field_ptr(OP_COPY, "count", count)?;
    let w = word_bytes(row_bytes, &[dp, sp]);
    let name = match w {
        16 => "copy_pages_counted_w16",
        4 => "copy_pages_counted_w4",
        _ => "copy_pages_counted_w2",
    };
    let mut f = func(&dev, &TIER_COPY, name)?;
    let mut max_blocks = COUNTED_MAX_BLOCKS;
    if let Some(s) = stream {
        // Beside other work: few blocks, so that they leave the SMs to it (PCIe needs
        // only ~100 KB in flight, a few dozen blocks of 256 threads).
        f.stream = s.clone();
        max_blocks = super::side_copy_blocks();
    }
    let words = row_bytes / w;
    let threads = (words.next_power_of_two().clamp(32, 256)) as u32;
    // Blocks stride over the pairs: a grid as large as `cap` would cost ~130 µs of
    // blocks that exit at once when few pages miss (the common case).
    launch!(
        f,
        cfg((cap as u32).min(max_blocks), threads, 0),
        dp,
        sp,
        pp,
        cp,
        cap as i32,
        words as i32,
        nd as u32,
        src_slots as u32
    )
}

struct SelectionToPages;

impl CustomOp2 for SelectionToPages {
    fn name(&self) -> &'static str {
        OP_SEL
    }

    fn cpu_fwd(
        &self,
        c: &CpuStorage,
        cl: &Layout,
        s: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, n) = cl.shape().dims3()?;
        let (_, _, k) = sl.shape().dims3()?;
        let (cand, sel) = match (c, s) {
            (CpuStorage::U32(c), CpuStorage::U32(s)) => {
                let (c0, c1) = cl
                    .contiguous_offsets()
                    .ok_or_else(|| candle_core::Error::Msg(format!("{OP_SEL}: candidates must be contiguous")))?;
                let (s0, s1) = sl
                    .contiguous_offsets()
                    .ok_or_else(|| candle_core::Error::Msg(format!("{OP_SEL}: selection must be contiguous")))?;
                (&c[c0..c1], &s[s0..s1])
            }
            _ => candle_core::bail!("{OP_SEL}: candidates and selection must be u32"),
        };
        let mut out = vec![NONE; b * h * k * 2];
        for (i, &idx) in sel.iter().enumerate() {
            let r = i / k;
            if idx != NONE && (idx as usize) < n {
                let slot = cand[r * n + idx as usize];
                out[2 * i] = slot;
                out[2 * i + 1] = if slot == NONE { NONE } else { idx };
            }
        }
        Ok((CpuStorage::U32(out), Shape::from_dims(&[b, h, k, 2])))
    }

    fn cuda_fwd(
        &self,
        c: &CudaStorage,
        cl: &Layout,
        s: &CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (b, h, n) = cl.shape().dims3()?;
        let (_, _, k) = sl.shape().dims3()?;
        let dev = super::device(c).clone();
        let total = b * h * k;
        let (out, op) = alloc::<u32>(&dev, total * 2)?;
        let shape = Shape::from_dims(&[b, h, k, 2]);
        if total > 0 {
            let cp = ptr(OP_SEL, c, cl)?;
            let spp = ptr(OP_SEL, s, sl)?;
            let f = func(&dev, &TIER_COPY, "selection_to_pages")?;
            let blocks = total.div_ceil(256).min(65535) as u32;
            launch!(f, cfg(blocks, 256, 0), cp, spp, op, (b * h) as i32, n as i32, k as i32)?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
    }
}

/// Turns a top-k selection of candidate indices into the page list of
/// [`sparse_paged_attention`](crate::ops::sparse_paged_attention), on the device of the
/// inputs (no host synchronization on CUDA).
///
/// # Arguments
/// * `candidates` — `[B, Hkv, N]` u32 slots in logical page order (as given to
///   [`quest_page_scores`](crate::ops::quest_page_scores)).
/// * `selection` — `[B, Hkv, K]` u32 candidate indices (logical page numbers), e.g. from
///   [`topk_indices`](crate::ops::topk_indices) reshaped; [`NONE`] pads.
///
/// Returns `[B, Hkv, K, 2]` u32 `(slot, logical page)` entries, `(NONE, NONE)` for padding.
pub fn selection_to_pages(candidates: &Tensor, selection: &Tensor) -> Result<Tensor> {
    let (b, h, _) = candidates.dims3()?;
    let (sb, sh, _) = selection.dims3()?;
    if (sb, sh) != (b, h) || candidates.dtype() != DType::U32 || selection.dtype() != DType::U32 {
        crate::invalid!(
            OP_SEL,
            "candidates {:?} ({:?}) and selection {:?} ({:?}) must be u32 [B, Hkv, N] and [B, Hkv, K]",
            candidates.dims(),
            candidates.dtype(),
            selection.dims(),
            selection.dtype()
        );
    }
    if !candidates.device().same_device(selection.device()) {
        crate::invalid!(OP_SEL, "candidates and selection must be on one device");
    }
    let c = candidates.contiguous()?;
    let s = selection.contiguous()?;
    Ok(c.apply_op2_no_bwd(&s, &SelectionToPages)?)
}
