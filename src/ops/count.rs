//! [`count_listed_into`]: adds the number of listed entries of a page list to a counter,
//! in place on the device (one launch; no host synchronization), for step statistics
//! counted inside padded steps and CUDA graphs.

use super::{util, NONE};
use crate::Result;
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Tensor};

const OP: &str = "count_listed_into";

struct CountListed {
    pairs: Tensor,
    index: usize,
}

impl InplaceOp1 for CountListed {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, counts: &mut CpuStorage, cl: &Layout) -> candle_core::Result<()> {
        let pairs = util::u32_field(OP, &self.pairs)?;
        let n = pairs.chunks_exact(2).filter(|w| w[0] != NONE).count();
        let (a, _) = util::contiguous_range(OP, cl)?;
        match counts {
            CpuStorage::F32(v) => v[a + self.index] += n as f32,
            _ => candle_core::bail!("{OP}: counts must be f32"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, counts: &mut candle_core::CudaStorage, cl: &Layout) -> candle_core::Result<()> {
        crate::ops::cuda::page_table::count_listed(counts, cl, &self.pairs, self.index)
    }
}

/// `counts[index] += ` the number of entries of `pairs` whose first word is not
/// [`NONE`], in place on the counters' device.
///
/// # Arguments
/// * `counts` — `[L]` f32 counters (exact below 2^24).
/// * `pairs` — `[.., 2]` u32 page list entries `(index, page)`, `(NONE, NONE)` where empty
///   (any leading dims, contiguous).
pub fn count_listed_into(counts: &Tensor, index: usize, pairs: &Tensor) -> Result<()> {
    util::check_shape(OP, "counts", counts, &[None], "[L]")?;
    util::check_dtype(OP, "counts", counts, &[DType::F32])?;
    if index >= counts.dim(0)? {
        crate::invalid!(OP, "index {index} past counts {:?}", counts.dims());
    }
    if pairs.rank() == 0 || pairs.dims()[pairs.rank() - 1] != 2 {
        crate::invalid!(OP, "pairs must have shape [.., 2], got {:?}", pairs.dims());
    }
    util::check_dtype(OP, "pairs", pairs, &[DType::U32])?;
    util::check_device(OP, counts.device(), &[("pairs", pairs)])?;
    util::check_contiguous(OP, &[("counts", counts), ("pairs", pairs)])?;
    counts.inplace_op1(&CountListed {
        pairs: pairs.clone(),
        index,
    })?;
    Ok(())
}
