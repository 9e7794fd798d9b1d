//! Top-k selection over partition scores.

use super::util;
use super::NONE;
use crate::Result;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

const OP: &str = "topk_indices";

struct TopK {
    k: usize,
}

fn topk_cpu(scores: &[f32], n: usize, k: usize) -> Vec<u32> {
    let rows = scores.len() / n.max(1);
    let mut out = vec![NONE; rows * k];
    out.par_chunks_mut(k).enumerate().for_each(|(r, dst)| {
        let row = &scores[r * n..(r + 1) * n];
        let mut idx: Vec<u32> = (0..n as u32).filter(|&i| row[i as usize] > f32::NEG_INFINITY).collect();
        // Descending score, ties to the lower index: deterministic on every backend.
        let cmp = |a: &u32, b: &u32| {
            row[*b as usize]
                .partial_cmp(&row[*a as usize])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(b))
        };
        if idx.len() > k {
            idx.select_nth_unstable_by(k, cmp);
            idx.truncate(k);
        }
        idx.sort_unstable_by(cmp);
        dst[..idx.len()].copy_from_slice(&idx);
    });
    out
}

impl CustomOp1 for TopK {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (r, n) = l.shape().dims2()?;
        let (a, b) = util::contiguous_range(OP, l)?;
        let scores = match s {
            CpuStorage::F32(v) => &v[a..b],
            _ => candle_core::bail!("{OP}: scores must be f32"),
        };
        Ok((
            CpuStorage::U32(topk_cpu(scores, n, self.k)),
            Shape::from_dims(&[r, self.k]),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        if let Some(r) = crate::ops::cuda::topk::topk(s, l, self.k)? {
            return Ok(r);
        }
        // More than the GPU kernel's shared-memory sort holds per row: the CPU reference.
        let (cpu, shape) = self.cpu_fwd(&s.to_cpu_storage()?, l)?;
        let data = match cpu {
            CpuStorage::U32(v) => v,
            _ => candle_core::bail!("{OP}: internal error (CPU fallback returned non-u32)"),
        };
        let dev = s.device().clone();
        let slice = dev.clone_htod(&data)?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(slice, dev), shape))
    }
}

/// Indices of the `k` largest scores of each row, in descending score order (ties to the
/// lower index). Scores of `-inf` are never chosen; rows with fewer than `k` finite or
/// `+inf` scores are padded with [`NONE`].
///
/// # Arguments
/// * `scores` — `[R, N]` f32.
/// * `k` — entries per row, `k >= 1`.
///
/// Returns `[R, k]` u32.
pub fn topk_indices(scores: &Tensor, k: usize) -> Result<Tensor> {
    util::check_shape(OP, "scores", scores, &[None, None], "[R, N]")?;
    util::check_dtype(OP, "scores", scores, &[DType::F32])?;
    util::check_contiguous(OP, &[("scores", scores)])?;
    if k == 0 {
        crate::invalid!(OP, "k must be >= 1 (scores {:?})", scores.dims());
    }
    let (r, n) = scores.dims2()?;
    if r == 0 || n == 0 {
        return Ok(Tensor::full(NONE, (r, k), scores.device())?);
    }
    Ok(scores.apply_op1_no_bwd(&TopK { k })?)
}
