//! Batched page copy between tiers: one call moves a step's misses (host → fast tier).

use super::util::{self, Elem};
use crate::Result;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor};

const OP: &str = "copy_pages";

struct CopyPages {
    pairs: Tensor,
}

fn copy_cpu<T: Elem>(dst: &mut [T], src: &[T], pairs: &[u32], page_elems: usize) -> candle_core::Result<()> {
    let (nd, ns) = (dst.len() / page_elems, src.len() / page_elems);
    for p in pairs.chunks_exact(2) {
        let (s, d) = (p[0] as usize, p[1] as usize);
        if s >= ns || d >= nd {
            candle_core::bail!("{OP}: pair ({s} -> {d}) out of range (src {ns} slots, dst {nd} slots)");
        }
        dst[d * page_elems..(d + 1) * page_elems].copy_from_slice(&src[s * page_elems..(s + 1) * page_elems]);
    }
    Ok(())
}

impl InplaceOp2 for CopyPages {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, src: &CpuStorage, sl: &Layout) -> candle_core::Result<()> {
        let pairs = util::u32_field(OP, &self.pairs)?;
        let page_elems: usize = dl.dims()[1..].iter().product();
        let (d0, d1) = util::contiguous_range(OP, dl)?;
        let (s0, s1) = util::contiguous_range(OP, sl)?;
        util::with_float_storages!(OP, (dst, src) => |d, s| copy_cpu(&mut d[d0..d1], &s[s0..s1], &pairs, page_elems))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dl: &Layout,
        src: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        crate::ops::cuda::tier_copy::copy_pages(dst, dl, src, sl, &self.pairs)
    }
}

/// Copies whole pages `src[pairs[i, 0]] → dst[pairs[i, 1]]`, in place in `dst`.
///
/// # Arguments
/// * `dst`, `src` — page pools `[slots, …]` with equal page shape and dtype (slot counts
///   may differ: fast tier vs host tier).
/// * `pairs` — `[n, 2]` u32 `(src slot, dst slot)`; destinations must be distinct.
pub fn copy_pages(dst: &Tensor, src: &Tensor, pairs: &Tensor) -> Result<()> {
    if dst.rank() < 2 || dst.dims()[1..] != src.dims()[1..] {
        crate::invalid!(
            OP,
            "dst {:?} and src {:?} must be page pools with the same page shape",
            dst.dims(),
            src.dims()
        );
    }
    if dst.dims()[1..].contains(&0) {
        crate::invalid!(
            OP,
            "pages of dst {:?} and src {:?} hold no element (a page size or head dim of 0)",
            dst.dims(),
            src.dims()
        );
    }
    util::check_dtype(OP, "dst", dst, util::FLOAT_DTYPES)?;
    util::check_same_dtype(OP, ("dst", dst), ("src", src))?;
    util::check_shape(OP, "pairs", pairs, &[None, Some(2)], "[n, 2]")?;
    util::check_dtype(OP, "pairs", pairs, &[DType::U32])?;
    util::check_contiguous(OP, &[("dst", dst), ("src", src), ("pairs", pairs)])?;
    if pairs.dims()[0] == 0 {
        return Ok(());
    }
    if !src.device().same_device(dst.device()) {
        // Cross-device tiers (host RAM → GPU): a plain per-page copy through candle until
        // the zero-copy gather kernel lands.
        let list = pairs.to_device(&candle_core::Device::Cpu)?.to_vec2::<u32>()?;
        for p in list {
            let page = src.narrow(0, p[0] as usize, 1)?.to_device(dst.device())?;
            dst.slice_set(&page, 0, p[1] as usize)?;
        }
        return Ok(());
    }
    util::check_device(OP, dst.device(), &[("pairs", pairs)])?;
    dst.inplace_op2(src, &CopyPages { pairs: pairs.clone() })?;
    Ok(())
}
