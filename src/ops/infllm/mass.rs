//! The attention masses of the windows ([`infllm_window_mass`]) and the finalization of
//! the blocks they complete ([`infllm_finalize`]).

use super::{check_max_n, check_ring, check_runs, read_runs, ring_words, util, InfLlmGeometry, FINALIZE, MASS};
use crate::ops::util::Elem;
use crate::ops::NONE;
use crate::Result;
use candle_core::{CpuStorage, InplaceOp3, Layout, Tensor};
use rayon::prelude::*;

struct WindowMass {
    runs: Tensor,
    window: usize,
    scale: f32,
    max_n: usize,
}

/// The mass the queries of each run give the keys of their windows (see the module
/// docs), added to the mass plane. `q` `[T, Hq, D]` f32 values.
fn mass_cpu<T: Elem>(
    m: &mut [u32],
    ring: &[T],
    q: &[f32],
    runs: &[[usize; 4]],
    (w, h, d, hq): (usize, usize, usize, usize),
    window: usize,
    scale: f32,
) {
    let g = hq / h;
    let key = |o: usize, t: usize, hh: usize| &ring[((o * w + t % w) * h + hh) * d..][..d];
    let dot = |a: &[f32], b: &[T]| a.iter().zip(b).map(|(x, y)| x * y.to_f32()).sum::<f32>();
    let plane = w * h;
    let adds: Vec<Vec<(usize, f32)>> = runs
        .par_iter()
        .map(|&[o, start, n, row]| {
            let mut out = Vec::new();
            if n == 0 {
                return out;
            }
            // Log-sum-exp of each (query, head) over its window.
            let mut lse = vec![0f32; n * hq];
            for j in 0..n {
                let a = start + j;
                for qh in 0..hq {
                    let qv = &q[((row + j) * hq + qh) * d..][..d];
                    let lo = (a + 1).saturating_sub(window);
                    let s: Vec<f32> = (lo..=a).map(|t| dot(qv, key(o, t, qh / g)) * scale).collect();
                    let mx = s.iter().fold(f32::NEG_INFINITY, |x, &y| x.max(y));
                    lse[j * hq + qh] = mx + s.iter().map(|x| (x - mx).exp()).sum::<f32>().ln();
                }
            }
            for t in (start + 1).saturating_sub(window)..start + n {
                for hh in 0..h {
                    let kv = key(o, t, hh);
                    let mut sum = 0f32;
                    for a in t.max(start)..(t + window).min(start + n) {
                        let j = a - start;
                        for qh in hh * g..(hh + 1) * g {
                            let qv = &q[((row + j) * hq + qh) * d..][..d];
                            sum += (dot(qv, kv) * scale - lse[j * hq + qh]).exp();
                        }
                    }
                    out.push((o * 4 * plane + plane + (t % w) * h + hh, sum));
                }
            }
            out
        })
        .collect();
    for (at, x) in adds.into_iter().flatten() {
        m[at] = (f32::from_bits(m[at]) + x).to_bits();
    }
}

impl InplaceOp3 for WindowMass {
    fn name(&self) -> &'static str {
        MASS
    }

    fn cpu_fwd(
        &self,
        m: &mut CpuStorage,
        ml: &Layout,
        r: &CpuStorage,
        rl: &Layout,
        q: &CpuStorage,
        ql: &Layout,
    ) -> candle_core::Result<()> {
        let (s, w, h, d) = rl.shape().dims4()?;
        let (t, hq, _) = ql.shape().dims3()?;
        let runs = read_runs(MASS, &self.runs, s, Some(t))?;
        check_max_n(MASS, &runs, self.max_n)?;
        let qv = util::float_values(MASS, q, ql)?;
        let (r0, r1) = util::contiguous_range(MASS, rl)?;
        let m = ring_words(MASS, m, ml)?;
        let dims = (w, h, d, hq);
        match r {
            CpuStorage::F32(r) => mass_cpu(m, &r[r0..r1], &qv, &runs, dims, self.window, self.scale),
            CpuStorage::F16(r) => mass_cpu(m, &r[r0..r1], &qv, &runs, dims, self.window, self.scale),
            CpuStorage::BF16(r) => mass_cpu(m, &r[r0..r1], &qv, &runs, dims, self.window, self.scale),
            _ => candle_core::bail!("{MASS}: ring_k must be f32, f16 or bf16"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        m: &mut candle_core::CudaStorage,
        ml: &Layout,
        r: &candle_core::CudaStorage,
        rl: &Layout,
        q: &candle_core::CudaStorage,
        ql: &Layout,
    ) -> candle_core::Result<()> {
        crate::ops::cuda::infllm::window_mass(m, ml, r, rl, q, ql, &self.runs, self.window, self.scale, self.max_n)
    }
}

/// Adds to the mass plane of `ring_m`, in place, the attention mass each run's queries
/// give the keys of their windows (softmax over the `window` keys ending at the query,
/// scaled by `scale`, summed over the query heads of each KV head). The runs' keys must
/// be in the ring already ([`infllm_ring_write`](super::infllm_ring_write)).
///
/// # Arguments
/// * `ring_m` — `[S, 4, ring, Hkv]` u32; `ring_k` — `[S, ring, Hkv, D]`.
/// * `q` — `[T, Hq, D]` post-RoPE queries (`Hq` a multiple of `Hkv`), same dtype as `ring_k`.
/// * `runs` — `[R, 4]` u32, no run longer than `max_n` tokens.
pub fn infllm_window_mass(
    ring_m: &Tensor,
    ring_k: &Tensor,
    q: &Tensor,
    runs: &Tensor,
    (window, scale): (usize, f32),
    max_n: usize,
) -> Result<()> {
    let (_, _, h, d) = check_ring(MASS, ring_k, ring_m)?;
    util::check_shape(MASS, "q", q, &[None, None, Some(d)], &format!("[T, Hq, {d}]"))?;
    let hq = q.dim(1)?;
    if hq == 0 || hq % h != 0 {
        crate::invalid!(
            MASS,
            "q {:?} has {hq} heads, not a multiple of the ring's {h} KV heads",
            q.dims()
        );
    }
    util::check_same_dtype(MASS, ("ring_k", ring_k), ("q", q))?;
    util::check_device(MASS, ring_k.device(), &[("q", q)])?;
    util::check_contiguous(MASS, &[("q", q)])?;
    util::check_nonzero(MASS, "window", window, ("q", q))?;
    if check_runs(MASS, runs, ring_k.device())? == 0 {
        return Ok(());
    }
    ring_m.inplace_op3(
        ring_k,
        q,
        &WindowMass {
            runs: runs.clone(),
            window,
            scale,
            max_n,
        },
    )?;
    Ok(())
}

struct Finalize {
    runs: Tensor,
    geo: InfLlmGeometry,
    max_n: usize,
}

/// The ends of the blocks a run finalizes: multiples of `block` in
/// `(start + 1 - window, start + n + 1 - window]`, at least `block`.
pub(crate) fn finalized_ends(geo: &InfLlmGeometry, start: usize, n: usize) -> impl Iterator<Item = usize> {
    let lo = (start + 1).saturating_sub(geo.window); // exclusive (finalized before)
    let hi = (start + n + 1).saturating_sub(geo.window);
    let block = geo.block;
    let first = (lo / block + 1) * block;
    (first..=hi).step_by(block).filter(move |&e| e >= block && n > 0)
}

/// The `r` tokens of `tokens` of most `mass` (ties: the earlier).
fn top_tokens(tokens: std::ops::Range<usize>, r: usize, mass: impl Fn(usize) -> f32) -> Vec<usize> {
    let mut order: Vec<usize> = tokens.collect();
    order.sort_by(|&x, &y| mass(y).total_cmp(&mass(x)).then(x.cmp(&y)));
    order.truncate(r);
    order
}

impl InplaceOp3 for Finalize {
    fn name(&self) -> &'static str {
        FINALIZE
    }

    fn cpu_fwd(
        &self,
        rep: &mut CpuStorage,
        pl: &Layout,
        r: &CpuStorage,
        rl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
    ) -> candle_core::Result<()> {
        let (s, w, h, d) = rl.shape().dims4()?;
        let (slots, kpp, _) = pl.shape().dims3()?;
        let runs = read_runs(FINALIZE, &self.runs, s, None)?;
        check_max_n(FINALIZE, &runs, self.max_n)?;
        let m = util::u32_slice(FINALIZE, m, ml)?;
        let (p0, p1) = util::contiguous_range(FINALIZE, pl)?;
        let (r0, r1) = util::contiguous_range(FINALIZE, rl)?;
        let geo = self.geo;
        let plane = w * h;
        fn put<T: Copy>(rep: &mut [T], ring: &[T], at: usize, from: usize, d: usize) {
            rep[at * d..(at + 1) * d].copy_from_slice(&ring[from * d..(from + 1) * d]);
        }
        util::with_float_storages!(FINALIZE, (rep, r) => |rep, ring| {
            let (rep, ring) = (&mut rep[p0..p1], &ring[r0..r1]);
            for &[o, start, n, _] in &runs {
                let base = o * 4 * plane;
                for e in finalized_ends(&geo, start, n) {
                    let b0 = e - geo.block;
                    for hh in 0..h {
                        for (ri, tok) in top_tokens(b0..e, geo.repr, |t| f32::from_bits(m[base + plane + (t % w) * h + hh])).into_iter().enumerate() {
                            let page_tok = b0 + (ri / kpp) * geo.page_size;
                            let slot = m[base + (page_tok % w) * h + hh];
                            if slot == NONE {
                                continue;
                            }
                            if slot as usize >= slots {
                                candle_core::bail!("{FINALIZE}: page slot {slot} out of range ({slots} slots)");
                            }
                            put(rep, ring, slot as usize * kpp + ri % kpp, (o * w + tok % w) * h + hh, d);
                        }
                    }
                }
            }
            Ok(())
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        rep: &mut candle_core::CudaStorage,
        pl: &Layout,
        r: &candle_core::CudaStorage,
        rl: &Layout,
        m: &candle_core::CudaStorage,
        ml: &Layout,
    ) -> candle_core::Result<()> {
        crate::ops::cuda::infllm::finalize(rep, pl, r, rl, m, ml, &self.runs, &self.geo, self.max_n)
    }
}

/// Finalizes, in place in `repr`, every block a run completes (module docs): for each KV
/// head, its `repr` keys of most mass are copied from the ring to the page slots of the
/// block (the `r`-th to its `r / kpp`-th page's slot, index `r % kpp`). Call it after
/// [`infllm_window_mass`] for the same runs.
///
/// # Arguments
/// * `repr` — `[slots, kpp, D]` (kpp = [`InfLlmGeometry::keys_per_page`]), ring_k's dtype.
/// * `ring_k` — `[S, ring, Hkv, D]`; `ring_m` — `[S, 4, ring, Hkv]` u32.
/// * `runs` — `[R, 4]` u32, no run longer than `max_n` tokens.
pub fn infllm_finalize(
    repr: &Tensor,
    ring_k: &Tensor,
    ring_m: &Tensor,
    runs: &Tensor,
    geo: &InfLlmGeometry,
    max_n: usize,
) -> Result<()> {
    geo.check(FINALIZE)?;
    let (_, w, _, d) = check_ring(FINALIZE, ring_k, ring_m)?;
    let kpp = geo.keys_per_page();
    util::check_shape(
        FINALIZE,
        "repr",
        repr,
        &[None, Some(kpp), Some(d)],
        &format!("[slots, {kpp}, {d}]"),
    )?;
    util::check_same_dtype(FINALIZE, ("repr", repr), ("ring_k", ring_k))?;
    util::check_device(FINALIZE, ring_k.device(), &[("repr", repr)])?;
    util::check_contiguous(FINALIZE, &[("repr", repr)])?;
    if w != geo.ring {
        crate::invalid!(
            FINALIZE,
            "ring_k {:?} holds {w} tokens, the geometry {}",
            ring_k.dims(),
            geo.ring
        );
    }
    if check_runs(FINALIZE, runs, ring_k.device())? == 0 {
        return Ok(());
    }
    repr.inplace_op3(
        ring_k,
        ring_m,
        &Finalize {
            runs: runs.clone(),
            geo: *geo,
            max_n,
        },
    )?;
    Ok(())
}
