//! Launch glue for `kernels/quest_score.cu`: Quest page scores on CUDA (used by
//! [`quest_page_scores`](crate::ops::quest_page_scores)).

use super::{alloc, func, launch, occupancy, ptr, sm_count, suffix, QUEST_SCORE};
use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, Layout, Result, Shape, Tensor};

const OP: &str = "quest_page_scores";
const THREADS: u32 = 128;
/// Most candidates one block of the vectorized kernel stages (QS_MAX_CPB).
const MAX_CPB: usize = 2048;
/// Candidates each lane group keeps in flight (QS_UNROLL in the kernel).
const UNROLL: usize = 4;

/// Scores `[B, Hkv, N]` f32 of every candidate page, from bounds in q's dtype or int8
/// bounds (`meta` u8 `[slots, 2·d + 16]`).
pub(crate) fn quest_page_scores(
    q: &CudaStorage,
    ql: &Layout,
    meta: &CudaStorage,
    ml: &Layout,
    candidates: &Tensor,
    sink_pages: usize,
    window_pages: usize,
) -> Result<(CudaStorage, Shape)> {
    let (b, hq, d) = ql.shape().dims3()?;
    let slots = ml.dims()[0];
    let (_, hkv, n) = candidates.dims3()?;
    let rows = b * hkv;
    let dev = super::device(q).clone();
    let (out, op) = alloc::<f32>(&dev, rows * n)?;
    let shape = Shape::from_dims(&[b, hkv, n]);
    if rows * n == 0 {
        return Ok((CudaStorage::wrap_cuda_slice(out, dev), shape));
    }
    if rows > 65535 {
        candle_core::bail!("{OP}: B * Hkv = {rows} rows exceeds the 65535 the kernel grid allows");
    }
    let qp = ptr(OP, q, ql)?;
    let mp = ptr(OP, meta, ml)?;
    let cp = super::field_ptr(OP, "candidates", candidates)?;
    let es = q.dtype().size_in_bytes();
    let v = 16 / es;
    let lanes = d / v;
    let vec_ok = d % v == 0 && lanes.is_power_of_two() && lanes <= 32 && qp % 16 == 0 && mp % 16 == 0;
    let g = hq / hkv.max(1);
    let sfx = suffix(OP, q.dtype())?;
    // Tensor-core kernel for the 16-bit types at head_dim 64/128 and groups up to 16.
    let mma = matches!(sfx, "bf16" | "f16") && (d == 64 || d == 128) && g <= 16 && mp % 16 == 0;
    let name: &'static str = match (sfx, d, g <= 8) {
        _ if !mma => "",
        ("bf16", 128, true) => "quest_scores_mma_bf16_d128_g8",
        ("bf16", 128, false) => "quest_scores_mma_bf16_d128_g16",
        ("bf16", _, true) => "quest_scores_mma_bf16_d64_g8",
        ("bf16", _, false) => "quest_scores_mma_bf16_d64_g16",
        (_, 128, true) => "quest_scores_mma_f16_d128_g8",
        (_, 128, false) => "quest_scores_mma_f16_d128_g16",
        (_, _, true) => "quest_scores_mma_f16_d64_g8",
        (_, _, false) => "quest_scores_mma_f16_d64_g16",
    };
    let q8 = meta.dtype() == candle_core::DType::U8;
    let name: &'static str = if q8 {
        match (mma, sfx, d, g <= 8) {
            (false, "bf16", ..) => "quest_scores_q8_generic_bf16",
            (false, "f16", ..) => "quest_scores_q8_generic_f16",
            (false, ..) => "quest_scores_q8_generic_f32",
            (_, "bf16", 128, true) => "quest_scores_q8_mma_bf16_d128_g8",
            (_, "bf16", 128, false) => "quest_scores_q8_mma_bf16_d128_g16",
            (_, "bf16", _, true) => "quest_scores_q8_mma_bf16_d64_g8",
            (_, "bf16", _, false) => "quest_scores_q8_mma_bf16_d64_g16",
            (_, _, 128, true) => "quest_scores_q8_mma_f16_d128_g8",
            (_, _, 128, false) => "quest_scores_q8_mma_f16_d128_g16",
            (_, _, _, true) => "quest_scores_q8_mma_f16_d64_g8",
            (_, _, _, false) => "quest_scores_q8_mma_f16_d64_g16",
        }
    } else if mma {
        name
    } else {
        match (vec_ok, g <= 4, sfx) {
            (true, true, "bf16") => "quest_scores_vec4_bf16",
            (true, true, "f16") => "quest_scores_vec4_f16",
            (true, true, _) => "quest_scores_vec4_f32",
            (true, false, "bf16") => "quest_scores_vec8_bf16",
            (true, false, "f16") => "quest_scores_vec8_f16",
            (true, false, _) => "quest_scores_vec8_f32",
            (false, _, "bf16") => "quest_scores_generic_bf16",
            (false, _, "f16") => "quest_scores_generic_f16",
            (false, _, _) => "quest_scores_generic_f32",
        }
    };
    let f = func(&dev, &QUEST_SCORE, name)?;
    // Candidates per block: one wave of resident blocks over the whole launch, in whole
    // rounds of the block's lane groups.
    let vec_ok = vec_ok && !q8;
    let per_round = if mma {
        (THREADS / 32) as usize * 16
    } else if vec_ok {
        (THREADS as usize / lanes) * UNROLL
    } else {
        (THREADS / 32) as usize
    };
    let target = (sm_count(&dev)? * occupancy(&f, name, THREADS)?) as usize;
    let blocks_per_row = target.div_ceil(rows).max(1);
    let mut cpb = n.div_ceil(blocks_per_row).div_ceil(per_round).max(1) * per_round;
    if mma || vec_ok {
        cpb = cpb.min(MAX_CPB / per_round * per_round);
    }
    let bx = n.div_ceil(cpb) as u32;
    let lc = super::cfg3((bx, rows as u32, 1), THREADS, 0);
    launch!(
        f,
        lc,
        qp,
        mp,
        cp,
        op,
        hq as i32,
        hkv as i32,
        n as i32,
        d as i32,
        sink_pages.min(i32::MAX as usize) as i32,
        window_pages.min(i32::MAX as usize) as i32,
        slots as u32,
        cpb as i32
    )?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}
