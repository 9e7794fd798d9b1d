//! Quest's page bounds stored as int8 (issue 12): the row format, the CPU reference of
//! its update and of scoring with it, and a dequantizer for tests and diagnostics.
//!
//! A row of the u8 tensor `[slots, 2·D + QUEST_Q8_TAIL_BYTES]` holds one page's bounds:
//! bytes `[0, D)` the int8 mins, `[D, 2·D)` the int8 maxes, then the page's scale `2^e`
//! as a little-endian f32, then zeros. Bound `i` stands for `q_i · 2^e`.
//!
//! - **Outward rounding.** Mins round down and maxes up (`floor`/`ceil` of `x · 2^-e`),
//!   so the dequantized box contains the exact one and Quest's score stays an upper bound.
//! - **A power-of-two scale**: `e` is the smallest exponent with `max |k| ≤ 127 · 2^e` over
//!   the page's keys (clamped to `[QUEST_Q8_EXP_MIN, QUEST_Q8_EXP_MAX]`). Scaling by a power
//!   of two is exact, and `ceil(ceil(x) / 2^j) = ceil(x / 2^j)`, so widening a row by new
//!   keys (shifting the old integers when `e` grows) gives exactly the row that the page's
//!   exact bounds would quantize to. The row is a function of the page's keys alone, not
//!   of how they were grouped into calls: token by token, in prefill chunks, or rebuilt
//!   after an aborted step.
//! - Reads: `2·D + 16` bytes a page against `4·D` for bf16 bounds (272 against 512 at
//!   D = 128).

use super::kernel_consts::{QUEST_Q8_EXP_MAX, QUEST_Q8_EXP_MIN, QUEST_Q8_TAIL_BYTES};
use super::util::{self, Elem};
use super::NONE;
use crate::Result;
use candle_core::{DType, Device, Tensor};

/// Largest magnitude of a stored bound.
const QMAX: i32 = 127;

/// Bytes of one row of int8 bounds for head dim `d`.
pub fn quest_q8_row_bytes(d: usize) -> usize {
    2 * d + QUEST_Q8_TAIL_BYTES
}

/// Zeroed int8 page bounds `[slots, 2·D + 16]` u8 (every scale 0: every page scores 0
/// until its first key lands in row 0).
pub fn quest_q8_bounds(slots: usize, d: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::zeros((slots, quest_q8_row_bytes(d)), DType::U8, device)?)
}

/// `true` when `meta` is int8 bounds (`[slots, 2·d + 16]` u8) for head dim `d`.
pub(crate) fn is_q8(meta: &Tensor, d: usize) -> bool {
    meta.dtype() == DType::U8 && meta.rank() == 2 && meta.dims()[1] == quest_q8_row_bytes(d)
}

/// Checks Quest page bounds for head dim `d`: `[slots, 2, d]` in the dtype of `like`, or
/// int8 bounds `[slots, 2·d + 16]` u8. Returns `true` for int8.
pub(crate) fn check_bounds(op: &'static str, meta: &Tensor, d: usize, like: (&str, &Tensor)) -> Result<bool> {
    if meta.dtype() == DType::U8 {
        let rb = quest_q8_row_bytes(d);
        util::check_shape(
            op,
            "meta",
            meta,
            &[None, Some(rb)],
            &format!("[slots, {rb}] (int8 bounds, D = {d})"),
        )?;
        return Ok(true);
    }
    util::check_shape(op, "meta", meta, &[None, Some(2), Some(d)], &format!("[slots, 2, {d}]"))?;
    util::check_same_dtype(op, ("meta", meta), like)?;
    Ok(false)
}

/// The smallest `e` in `[EXP_MIN, EXP_MAX]` with `m ≤ 127 · 2^e` (`m ≥ 0`).
pub(crate) fn exponent_for(m: f32) -> i32 {
    let bits = m.to_bits();
    let biased = ((bits >> 23) & 0xff) as i32;
    if biased == 0 {
        return QUEST_Q8_EXP_MIN; // zero or subnormal: below 127 · 2^-126
    }
    // m = 1.f · 2^p; 127 · 2^(p-6) = 1.984375 · 2^p.
    let p = biased - 127;
    let e = p - 6 + i32::from(bits & 0x7f_ffff > 0x7e_0000);
    e.clamp(QUEST_Q8_EXP_MIN, QUEST_Q8_EXP_MAX)
}

/// `2^e` for `e` in the exponent range (a normal f32).
pub(crate) fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// The exponent of a stored scale (a zero scale reads as `EXP_MIN`).
fn exponent_of(scale: f32) -> i32 {
    let biased = ((scale.to_bits() >> 23) & 0xff) as i32;
    (biased - 127).clamp(QUEST_Q8_EXP_MIN, QUEST_Q8_EXP_MAX)
}

fn clamp_q(x: f32) -> i32 {
    (x as i32).clamp(-QMAX, QMAX)
}

/// `floor(q / 2^j)` and `ceil(q / 2^j)`.
fn shift_down(q: i32, j: i32) -> i32 {
    q >> j.min(31)
}
fn shift_up(q: i32, j: i32) -> i32 {
    -((-q) >> j.min(31))
}

fn scale_of(row: &[u8], d: usize) -> f32 {
    f32::from_le_bytes([row[2 * d], row[2 * d + 1], row[2 * d + 2], row[2 * d + 3]])
}

/// Widens (or, at `row == 0`, resets) the int8 bounds row `dst` with `key`.
fn widen_row<T: Elem>(dst: &mut [u8], key: &[T], reset: bool) {
    let d = key.len();
    let m = key.iter().fold(0f32, |m, x| m.max(x.to_f32().abs()));
    let e_new = exponent_for(m);
    let (e, shift) = if reset {
        (e_new, 0)
    } else {
        let e_old = exponent_of(scale_of(dst, d));
        let e = e_old.max(e_new);
        (e, e - e_old)
    };
    let inv = pow2(-e);
    for (i, x) in key.iter().enumerate() {
        let y = x.to_f32() * inv;
        let (lo, hi) = (clamp_q(y.floor()), clamp_q(y.ceil()));
        let (lo, hi) = if reset {
            (lo, hi)
        } else {
            let old_lo = shift_down(dst[i] as i8 as i32, shift);
            let old_hi = shift_up(dst[d + i] as i8 as i32, shift);
            (lo.min(old_lo), hi.max(old_hi))
        };
        dst[i] = lo as i8 as u8;
        dst[d + i] = hi as i8 as u8;
    }
    dst[2 * d..2 * d + 4].copy_from_slice(&pow2(e).to_le_bytes());
    dst[2 * d + 4..].fill(0);
}

/// CPU reference of [`quest_meta_update`](crate::ops::quest_meta_update) on int8 bounds:
/// `meta` `[slots, 2·d + 16]`, `k` `[T, H, d]`, `dst` `[T, H]` (`slot · page_size + row`).
pub(crate) fn update_cpu<T: Elem>(
    meta: &mut [u8],
    k: &[T],
    dst: &[u32],
    page_size: usize,
    d: usize,
) -> candle_core::Result<()> {
    let rb = quest_q8_row_bytes(d);
    let slots = meta.len() / rb;
    for (i, &code) in dst.iter().enumerate() {
        if code == NONE {
            continue;
        }
        let (slot, row) = (code as usize / page_size, code as usize % page_size);
        if slot >= slots {
            candle_core::bail!("quest_meta_update: slot {slot} out of range (metadata has {slots} slots)");
        }
        widen_row(&mut meta[slot * rb..(slot + 1) * rb], &k[i * d..(i + 1) * d], row == 0);
    }
    Ok(())
}

/// CPU reference of [`quest_page_scores`](crate::ops::quest_page_scores) on int8 bounds:
/// a page's score is `2^e · Σᵢ (qᵢ ≥ 0 ? qᵢ·maxᵢ : qᵢ·minᵢ)`, maxed over the GQA group.
pub(crate) fn scores_cpu<T: Elem>(
    q: &[T],
    meta: &[u8],
    cand: &[u32],
    dims: (usize, usize, usize, usize, usize),
    sink: usize,
    window: usize,
) -> candle_core::Result<Vec<f32>> {
    let d = dims.4;
    let rb = quest_q8_row_bytes(d);
    super::quest_score::score_lists(q, cand, dims, (sink, window, meta.len() / rb), |slot, group| {
        let r = &meta[slot * rb..(slot + 1) * rb];
        let best = super::quest_score::group_max(group, d, |qx, x| {
            let bound = if qx >= 0.0 { r[d + x] } else { r[x] };
            qx * f32::from(bound as i8)
        });
        best * scale_of(r, d)
    })
}

/// The bounds of int8 `meta` `[slots, 2·d + 16]` (on any device) as f32 `[slots, 2, d]`
/// (min, max) on the CPU: what Quest's scoring sees.
pub fn dequantize_quest_q8(meta: &Tensor, d: usize) -> Result<Tensor> {
    if !is_q8(meta, d) {
        crate::invalid!(
            "dequantize_quest_q8",
            "meta must be u8 [slots, {}] for head dim {d}, got {:?} {:?}",
            quest_q8_row_bytes(d),
            meta.dtype(),
            meta.dims()
        );
    }
    let rb = quest_q8_row_bytes(d);
    let bytes = meta.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<u8>()?;
    let slots = bytes.len() / rb;
    let mut out = Vec::with_capacity(slots * 2 * d);
    for r in bytes.chunks(rb) {
        let s = scale_of(r, d);
        out.extend(r[..2 * d].iter().map(|&v| f32::from(v as i8) * s));
    }
    Ok(Tensor::from_vec(out, (slots, 2, d), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponent_is_the_smallest_that_fits() {
        for &m in &[
            1e-30f32, 0.01, 0.5, 1.0, 1.5, 1.984375, 1.99, 2.0, 126.0, 127.0, 128.0, 3e5,
        ] {
            let e = exponent_for(m);
            assert!(m <= 127.0 * pow2(e), "{m}: e {e}");
            assert!(
                e == QUEST_Q8_EXP_MIN || m > 127.0 * pow2(e - 1),
                "{m}: e {e} not smallest"
            );
        }
        assert_eq!(exponent_for(0.0), QUEST_Q8_EXP_MIN);
        assert_eq!(exponent_for(127.0), 0);
        assert_eq!(exponent_for(127.5), 1);
    }

    #[test]
    fn widening_matches_quantizing_the_exact_bounds() {
        // Keys that grow in magnitude force rescales; the row must equal the one built
        // from the exact min/max in one go.
        let d = 8;
        let mut state = 0x1234_5678u64;
        let mut rnd = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for trial in 0..50 {
            let keys: Vec<Vec<f32>> = (0..16)
                .map(|t| {
                    (0..d)
                        .map(|_| rnd() * (1.0 + t as f32) * (trial as f32 + 0.1))
                        .collect()
                })
                .collect();
            let rb = quest_q8_row_bytes(d);
            let mut inc = vec![0u8; rb];
            for (t, k) in keys.iter().enumerate() {
                widen_row(&mut inc, k, t == 0);
            }
            // One go: the exact box, quantized by the same rule at its exponent.
            let (mut lo, mut hi) = (vec![f32::MAX; d], vec![f32::MIN; d]);
            for k in &keys {
                for i in 0..d {
                    lo[i] = lo[i].min(k[i]);
                    hi[i] = hi[i].max(k[i]);
                }
            }
            let mut once = vec![0u8; rb];
            let mut boxk: Vec<f32> = lo.clone();
            widen_row(&mut once, &boxk, true);
            boxk.clone_from(&hi);
            widen_row(&mut once, &boxk, false);
            assert_eq!(inc, once, "trial {trial}");
            // The dequantized box contains the exact one.
            let s = scale_of(&inc, d);
            for i in 0..d {
                assert!(f32::from(inc[i] as i8) * s <= lo[i] && f32::from(inc[d + i] as i8) * s >= hi[i]);
            }
        }
    }
}
