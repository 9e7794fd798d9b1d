//! [`shadowkv_rebuild`]: the keys of a decode step's chosen chunks rebuilt from the
//! low-rank factor, with their values, as a step-local page pool.

use super::{read_rows, util, REBUILD};
use crate::ops::util::FloatSlice;
use crate::ops::NONE;
use crate::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

pub(crate) struct Rebuild {
    pub(crate) top: Tensor,
    pub(crate) candidates: Tensor,
    pub(crate) rows: Tensor,
    pub(crate) left_map: Tensor,
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) values: Option<Tensor>,
}

/// Runs `f` on the CPU contents of a float tensor field.
fn with_field<R>(
    name: &str,
    t: &Tensor,
    f: impl FnOnce(FloatSlice<'_>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(util::float_slice(REBUILD, c, l)?),
        _ => candle_core::bail!(
            "{REBUILD}: {name} {:?} must be on the CPU with the op's inputs",
            t.dims()
        ),
    }
}

impl Rebuild {
    #[allow(clippy::too_many_arguments)]
    fn cpu(
        &self,
        left: FloatSlice<'_>,
        (lp, p, r): (usize, usize, usize),
        right: FloatSlice<'_>,
        hd: usize,
        cos: FloatSlice<'_>,
        sin: FloatSlice<'_>,
        values: Option<FloatSlice<'_>>,
    ) -> candle_core::Result<Vec<f32>> {
        let (b, h, k) = self.top.dims3()?;
        let n = self.candidates.dim(2)?;
        let d = hd / h;
        let half = d / 2;
        let positions = cos.len() / half.max(1);
        let owners = self.right_owners(right.len(), r, hd);
        let top = util::u32_field(REBUILD, &self.top)?;
        let cand = util::u32_field(REBUILD, &self.candidates)?;
        let lmap = util::float_field(REBUILD, "left_map", &self.left_map)?;
        let rows = read_rows(REBUILD, &self.rows, owners)?;
        let vslots = values.map_or(0, |v| v.len() / (2 * p * d).max(1));
        let mut out = vec![0f32; b * h * k * 2 * p * d];
        out.par_chunks_mut((2 * p * d).max(1))
            .enumerate()
            .try_for_each(|(e, dst)| -> candle_core::Result<()> {
                let bh = e / k;
                let (bi, hh) = (bh / h, bh % h);
                let t = top[e];
                if t == NONE {
                    return Ok(());
                }
                let t = t as usize;
                if t >= n {
                    candle_core::bail!("{REBUILD}: chunk {t} past the {n} candidate pages");
                }
                let slot = cand[bh * n + t];
                let s0 = cand[bi * h * n + t];
                if s0 as usize >= lmap.len() || slot == NONE {
                    candle_core::bail!("{REBUILD}: chunk {t} of row {bi} has no page (slot {s0})");
                }
                let page = lmap[s0 as usize] as usize;
                let owner = rows[bi][0];
                if page >= lp || owner >= owners || (t + 1) * p > positions {
                    candle_core::bail!(
                        "{REBUILD}: chunk {t} of row {bi}: left page {page} of {lp}, owner {owner} of {owners}, \
                         positions up to {} of {positions}",
                        (t + 1) * p
                    );
                }
                let (keys, vals) = dst.split_at_mut(p * d);
                for i in 0..p {
                    let arow = (page * p + i) * r;
                    let x: Vec<f32> = (0..d)
                        .map(|c| {
                            (0..r)
                                .map(|j| left.at(arow + j) * right.at((owner * r + j) * hd + hh * d + c))
                                .sum()
                        })
                        .collect();
                    let pos = t * p + i;
                    for c in 0..half {
                        let (cs, sn) = (cos.at(pos * half + c), sin.at(pos * half + c));
                        keys[i * d + c] = x[c] * cs - x[c + half] * sn;
                        keys[i * d + c + half] = x[c] * sn + x[c + half] * cs;
                    }
                }
                if let Some(v) = values {
                    if slot as usize >= vslots {
                        candle_core::bail!("{REBUILD}: value slot {slot} out of range ({vslots} slots)");
                    }
                    let base = (slot as usize * 2 + 1) * p * d;
                    for (i, o) in vals.iter_mut().enumerate() {
                        *o = v.at(base + i);
                    }
                }
                Ok(())
            })?;
        Ok(out)
    }

    fn right_owners(&self, len: usize, r: usize, hd: usize) -> usize {
        len / (r * hd).max(1)
    }
}

impl CustomOp2 for Rebuild {
    fn name(&self) -> &'static str {
        REBUILD
    }

    fn cpu_fwd(
        &self,
        left: &CpuStorage,
        ll: &Layout,
        right: &CpuStorage,
        rl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (lp, p, r) = ll.shape().dims3()?;
        let hd = rl.dims()[2];
        let (b, h, k) = self.top.dims3()?;
        let d = hd / h;
        let left_v = util::float_slice(REBUILD, left, ll)?;
        let right_v = util::float_slice(REBUILD, right, rl)?;
        let out = with_field("cos", &self.cos, |cos| {
            with_field("sin", &self.sin, |sin| match &self.values {
                Some(v) => with_field("values", v, |v| {
                    self.cpu(left_v, (lp, p, r), right_v, hd, cos, sin, Some(v))
                }),
                None => self.cpu(left_v, (lp, p, r), right_v, hd, cos, sin, None),
            })
        })?;
        Ok((
            util::float_storage(out, left.dtype()),
            Shape::from_dims(&[b * h * k, 2, p, d]),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        left: &candle_core::CudaStorage,
        ll: &Layout,
        right: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::shadowkv::rebuild(left, ll, right, rl, self)
    }
}

/// The keys of the chosen chunks rebuilt from the low-rank factor of the pre-RoPE keys,
/// with RoPE at their positions, and their values: `pool[e, 0]` = `RoPE(left[page] ·
/// right[owner][:, h·D..(h+1)·D])` and `pool[e, 1]` = `values[slot, 1]` for entry `e =
/// (b·Hkv + h)·K + k` choosing chunk `t = top[b, h, k]` (positions `t·P ..`), where `slot
/// = candidates[b, h, t]` and `page = left_map[candidates[b, 0, t]]` (left rows are kept
/// once per chunk, under its KV-head-0 page). Entries whose `top` is [`NONE`] are zero.
/// Products are summed in f32 (tensor cores on CUDA for f16/bf16, head dims 64 and
/// 128, ranks that are multiples of 16) and RoPE is applied in f32 before one rounding.
///
/// # Arguments
/// * `left` — `[LP, P, r]` left-factor rows by left page (f32, f16 or bf16).
/// * `right` — `[M, r, Hkv·D]` right factor of each owner (one layer's), left's dtype.
/// * `top` — `[B, Hkv, K]` u32 chosen chunks ([`NONE`]-padded); `candidates` —
///   `[B, Hkv, N]` u32 host slots; `rows` — `[B, 4]` u32 `(owner, position, n, row)`.
/// * `left_map` — `[S, 1]` f32 left page of each host slot (exact integers).
/// * `cos`, `sin` — `[T, D/2]` RoPE tables by position, left's dtype.
/// * `values` — `[S', 2, P, D]` page pool whose slot `slot` holds the page's values (the
///   direct-mapped fast tier), left's dtype; `None` leaves the value halves zero.
///
/// Returns `[B·Hkv·K, 2, P, D]` in left's dtype.
#[allow(clippy::too_many_arguments)]
pub fn shadowkv_rebuild(
    left: &Tensor,
    right: &Tensor,
    top: &Tensor,
    candidates: &Tensor,
    rows: &Tensor,
    left_map: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    values: Option<&Tensor>,
) -> Result<Tensor> {
    util::check_shape(REBUILD, "left", left, &[None, None, None], "[LP, P, r]")?;
    util::check_dtype(REBUILD, "left", left, util::FLOAT_DTYPES)?;
    let (_, p, r) = left.dims3()?;
    util::check_shape(REBUILD, "top", top, &[None, None, None], "[B, Hkv, K]")?;
    util::check_dtype(REBUILD, "top", top, &[DType::U32])?;
    let (b, h, _) = top.dims3()?;
    util::check_shape(
        REBUILD,
        "right",
        right,
        &[None, Some(r), None],
        &format!("[M, {r}, Hkv·D]"),
    )?;
    let hd = right.dim(2)?;
    if h == 0 || hd % h != 0 || (hd / h) % 2 != 0 || p == 0 || r == 0 {
        crate::invalid!(
            REBUILD,
            "right {:?} must hold Hkv = {h} heads of an even head dim, left {:?} a positive page size and rank",
            right.dims(),
            left.dims()
        );
    }
    let d = hd / h;
    util::check_shape(
        REBUILD,
        "candidates",
        candidates,
        &[Some(b), Some(h), None],
        &format!("[{b}, {h}, N]"),
    )?;
    util::check_shape(REBUILD, "rows", rows, &[Some(b), Some(4)], &format!("[{b}, 4]"))?;
    util::check_shape(REBUILD, "left_map", left_map, &[None, Some(1)], "[S, 1]")?;
    for (name, t) in [("cos", cos), ("sin", sin)] {
        util::check_shape(REBUILD, name, t, &[None, Some(d / 2)], &format!("[T, {}]", d / 2))?;
        util::check_same_dtype(REBUILD, ("left", left), (name, t))?;
    }
    if let Some(v) = values {
        util::check_shape(
            REBUILD,
            "values",
            v,
            &[None, Some(2), Some(p), Some(d)],
            &format!("[S, 2, {p}, {d}]"),
        )?;
        util::check_same_dtype(REBUILD, ("left", left), ("values", v))?;
    }
    util::check_same_dtype(REBUILD, ("left", left), ("right", right))?;
    for (name, t) in [("candidates", candidates), ("rows", rows)] {
        util::check_dtype(REBUILD, name, t, &[DType::U32])?;
    }
    util::check_dtype(REBUILD, "left_map", left_map, &[DType::F32])?;
    let fields = [
        ("right", right),
        ("top", top),
        ("candidates", candidates),
        ("rows", rows),
        ("left_map", left_map),
        ("cos", cos),
        ("sin", sin),
    ];
    util::check_device(REBUILD, left.device(), &fields)?;
    util::check_contiguous(REBUILD, &fields)?;
    util::check_contiguous(REBUILD, &[("left", left)])?;
    if let Some(v) = values {
        util::check_device(REBUILD, left.device(), &[("values", v)])?;
        util::check_contiguous(REBUILD, &[("values", v)])?;
    }
    let op = Rebuild {
        top: top.clone(),
        candidates: candidates.clone(),
        rows: rows.clone(),
        left_map: left_map.clone(),
        cos: cos.clone(),
        sin: sin.clone(),
        values: values.cloned(),
    };
    Ok(left.apply_op2_no_bwd(right, &op)?)
}
