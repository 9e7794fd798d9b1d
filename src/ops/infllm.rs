//! InfLLM's device state and the ops over it, so that its `index` and `select` are
//! device work only (padded decode steps and CUDA graphs can run them).
//!
//! **State.** Per (layer, owner) a *ring* of the latest `ring` tokens: their post-RoPE
//! keys `ring_k` `[S, ring, Hkv, D]` (cache dtype) and four u32 planes `ring_m`
//! `[S, 4, ring, Hkv]`: the host slot of each token's page, its attention mass (f32 bits),
//! the masses before the latest ring write (f32 bits, the *undo plane*), and in the first
//! word of the fourth plane the `start` of that write ([`NONE`] once restored): an
//! aborted step is rolled back by [`infllm_restore`] on the device, where the undo plane
//! is known to belong to the step.
//! Token `t` lives at ring entry `t % ring`. Per host slot, the representative keys
//! `repr` `[slots, kpp, D]`: a block's `r`-th representative key (of KV head `h`) lives in
//! the page slot of its `r / kpp`-th page (in head `h`), at index `r % kpp`, with
//! `kpp = ⌈repr / block_pages⌉`.
//!
//! **Runs.** Every op takes a `[R, 4]` u32 table of runs `(owner, start, n, row)`: the
//! sequence with owner index `owner` adds tokens `start..start + n`, at rows
//! `row..row + n` of the step's tensors. A run with `n = 0` is padding and is skipped.
//! A run's `n` must be at most `ring - window - block` ([`InfLlmGeometry::max_run`]).
//!
//! **Semantics** (those of `partition::InfLlm`): a key's mass is the softmax weight (over
//! the query's window of `window` keys ending at the query, per query head) that every
//! query whose window holds it gives it, summed over the query heads of its KV head. A
//! block of `block` tokens is finalized once no later window holds its last token: its
//! representatives are its `repr` keys of most mass (ties: the earlier token). After an
//! index call ending at token `E`, every block ending at or before `E + 1 - window` is
//! finalized.
//!
//! CPU functions are the reference; CUDA runs `kernels/infllm.cu`.

use super::util::{self, Elem};
use super::NONE;
use crate::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, InplaceOp2, InplaceOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Words per run of a runs table: owner, start, n, row.
pub const RUN_WORDS: usize = 4;

/// The sizes the ops share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfLlmGeometry {
    /// Keys a query's window holds (`window_tokens`).
    pub window: usize,
    /// Tokens per block (a multiple of `page_size`).
    pub block: usize,
    /// Representative keys per block and KV head.
    pub repr: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// Leading pages always attended.
    pub sink_pages: usize,
    /// Tokens the ring holds per (layer, owner).
    pub ring: usize,
}

impl InfLlmGeometry {
    /// Pages per block.
    pub fn block_pages(&self) -> usize {
        self.block / self.page_size.max(1)
    }

    /// Representative keys stored per page slot (`kpp`).
    pub fn keys_per_page(&self) -> usize {
        self.repr.div_ceil(self.block_pages().max(1))
    }

    /// Most pages past the finalized blocks (the pending tokens, always attended).
    pub fn pending_pages(&self) -> usize {
        (self.window + self.block - 1).div_ceil(self.page_size.max(1))
    }

    /// Most tokens one run may add in one call.
    pub fn max_run(&self) -> usize {
        self.ring.saturating_sub(self.window + self.block)
    }

    /// Blocks finalized once the token at `pos` is indexed (all of them eligible for the
    /// query at `pos`, past the sink).
    pub fn blocks_at(&self, pos: usize) -> usize {
        (pos + 1).saturating_sub(self.window) / self.block
    }

    fn check(&self, op: &'static str) -> Result<()> {
        let g = self;
        let ok = g.page_size > 0
            && g.window > 0
            && g.block > 0
            && g.block % g.page_size == 0
            && (1..=g.block).contains(&g.repr)
            && g.max_run() > 0
            && g.ring < u32::MAX as usize;
        if !ok {
            crate::invalid!(
                op,
                "geometry {g:?}: needs page_size, window and block >= 1, block a multiple of the page size, \
                 repr in 1..=block and ring > window + block"
            );
        }
        Ok(())
    }
}

fn check_runs(op: &'static str, runs: &Tensor, device: &candle_core::Device) -> Result<usize> {
    util::check_shape(
        op,
        "runs",
        runs,
        &[None, Some(RUN_WORDS)],
        "[R, 4] (owner, start, n, row)",
    )?;
    util::check_dtype(op, "runs", runs, &[DType::U32])?;
    util::check_device(op, device, &[("runs", runs)])?;
    util::check_contiguous(op, &[("runs", runs)])?;
    Ok(runs.dim(0)?)
}

/// `ring_k` `[S, ring, Hkv, D]` and `ring_m` `[S, 4, ring, Hkv]` u32; returns
/// `(S, ring, Hkv, D)`.
fn check_ring(op: &'static str, ring_k: &Tensor, ring_m: &Tensor) -> Result<(usize, usize, usize, usize)> {
    util::check_shape(op, "ring_k", ring_k, &[None, None, None, None], "[S, ring, Hkv, D]")?;
    util::check_dtype(op, "ring_k", ring_k, util::FLOAT_DTYPES)?;
    let (s, w, h, d) = ring_k.dims4()?;
    util::check_shape(
        op,
        "ring_m",
        ring_m,
        &[Some(s), Some(4), Some(w), Some(h)],
        &format!("[{s}, 4, {w}, {h}]"),
    )?;
    util::check_dtype(op, "ring_m", ring_m, &[DType::U32])?;
    util::check_device(op, ring_k.device(), &[("ring_m", ring_m)])?;
    util::check_contiguous(op, &[("ring_k", ring_k), ("ring_m", ring_m)])?;
    Ok((s, w, h, d))
}

/// The runs as `(owner, start, n, row)`, checked against `S` owners and `t` rows (CPU).
fn read_runs(op: &str, runs: &Tensor, owners: usize, rows: Option<usize>) -> candle_core::Result<Vec<[usize; 4]>> {
    let v = util::u32_field(op, runs)?;
    let out: Vec<[usize; 4]> = v
        .chunks_exact(RUN_WORDS)
        .map(|r| [r[0] as usize, r[1] as usize, r[2] as usize, r[3] as usize])
        .collect();
    for r in &out {
        if r[2] > 0 && (r[0] >= owners || rows.is_some_and(|t| r[3] + r[2] > t)) {
            candle_core::bail!("{op}: run {r:?} out of range ({owners} owners, {rows:?} rows)");
        }
    }
    Ok(out)
}

/// Fails when a run holds more than `max_n` tokens (the bound the CUDA grids are sized by).
fn check_max_n(op: &str, runs: &[[usize; 4]], max_n: usize) -> candle_core::Result<()> {
    if let Some(r) = runs.iter().find(|r| r[2] > max_n) {
        candle_core::bail!("{op}: run {r:?} holds more than max_n = {max_n} tokens");
    }
    Ok(())
}

const WRITE: &str = "infllm_ring_write";
const MASS: &str = "infllm_window_mass";
const FINALIZE: &str = "infllm_finalize";
const SCORES: &str = "infllm_block_scores";
const PAGES: &str = "infllm_pages";
const MASS_ADD: &str = "infllm_mass_add";
const RESTORE: &str = "infllm_restore";

struct RingKeys {
    runs: Tensor,
}

/// First run token that survives in the ring: only the last `ring` of a run are kept.
fn first_kept(n: usize, ring: usize) -> usize {
    n.saturating_sub(ring)
}

impl InplaceOp2 for RingKeys {
    fn name(&self) -> &'static str {
        WRITE
    }

    fn cpu_fwd(&self, r: &mut CpuStorage, rl: &Layout, k: &CpuStorage, kl: &Layout) -> candle_core::Result<()> {
        let (s, w, h, d) = rl.shape().dims4()?;
        let t = kl.dims()[0];
        let runs = read_runs(WRITE, &self.runs, s, Some(t))?;
        let (r0, r1) = util::contiguous_range(WRITE, rl)?;
        let (k0, k1) = util::contiguous_range(WRITE, kl)?;
        fn copy<T: Copy>(ring: &mut [T], k: &[T], runs: &[[usize; 4]], (w, h, d): (usize, usize, usize)) {
            for &[o, start, n, row] in runs {
                for j in first_kept(n, w)..n {
                    let e = (start + j) % w;
                    let dst = ((o * w + e) * h) * d;
                    ring[dst..dst + h * d].copy_from_slice(&k[(row + j) * h * d..][..h * d]);
                }
            }
        }
        util::with_float_storages!(WRITE, (r, k) => |r, k| {
            copy(&mut r[r0..r1], &k[k0..k1], &runs, (w, h, d));
            Ok(())
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        r: &mut candle_core::CudaStorage,
        rl: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
    ) -> candle_core::Result<()> {
        crate::ops::cuda::infllm::ring_keys(r, rl, k, kl, &self.runs)
    }
}

struct RingMeta {
    runs: Tensor,
    page_size: usize,
}

impl InplaceOp2 for RingMeta {
    fn name(&self) -> &'static str {
        WRITE
    }

    fn cpu_fwd(&self, m: &mut CpuStorage, ml: &Layout, dst: &CpuStorage, dl: &Layout) -> candle_core::Result<()> {
        let (s, _, w, h) = ml.shape().dims4()?;
        let t = dl.dims()[0];
        let runs = read_runs(WRITE, &self.runs, s, Some(t))?;
        let dst = util::u32_slice(WRITE, dst, dl)?;
        let (m0, m1) = util::contiguous_range(WRITE, ml)?;
        let CpuStorage::U32(m) = m else {
            candle_core::bail!("{WRITE}: ring_m must be u32");
        };
        let m = &mut m[m0..m1];
        let plane = w * h;
        for &[o, start, n, row] in &runs {
            if n == 0 {
                continue;
            }
            let base = o * 4 * plane;
            m.copy_within(base + plane..base + 2 * plane, base + 2 * plane);
            m[base + 3 * plane] = start as u32;
            for j in first_kept(n, w)..n {
                let e = (start + j) % w;
                for hh in 0..h {
                    let code = dst[(row + j) * h + hh];
                    m[base + e * h + hh] = if code == NONE {
                        NONE
                    } else {
                        code / self.page_size as u32
                    };
                    m[base + plane + e * h + hh] = 0f32.to_bits();
                }
            }
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        m: &mut candle_core::CudaStorage,
        ml: &Layout,
        dst: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> candle_core::Result<()> {
        crate::ops::cuda::infllm::ring_meta(m, ml, dst, dl, &self.runs, self.page_size)
    }
}

/// Writes the runs' new tokens into the ring, in place: their keys into `ring_k`, their
/// page slots (`dst / page_size`, `NONE` kept) and a zero mass into `ring_m`, after
/// copying each run's masses to the undo plane and its `start` to the flag word.
///
/// # Arguments
/// * `ring_k` — `[S, ring, Hkv, D]`, same dtype as `k`; `ring_m` — `[S, 4, ring, Hkv]` u32.
/// * `k` — `[T, Hkv, D]` post-RoPE keys; `dst` — `[T, Hkv]` u32 `slot · P + row`.
/// * `runs` — `[R, 4]` u32 (module docs).
pub fn infllm_ring_write(
    ring_k: &Tensor,
    ring_m: &Tensor,
    k: &Tensor,
    dst: &Tensor,
    runs: &Tensor,
    page_size: usize,
) -> Result<()> {
    let (_, _, h, d) = check_ring(WRITE, ring_k, ring_m)?;
    util::check_shape(WRITE, "k", k, &[None, Some(h), Some(d)], &format!("[T, {h}, {d}]"))?;
    let t = k.dim(0)?;
    util::check_shape(WRITE, "dst", dst, &[Some(t), Some(h)], &format!("[{t}, {h}]"))?;
    util::check_dtype(WRITE, "dst", dst, &[DType::U32])?;
    util::check_same_dtype(WRITE, ("ring_k", ring_k), ("k", k))?;
    util::check_nonzero(WRITE, "page_size", page_size, ("dst", dst))?;
    util::check_device(WRITE, ring_k.device(), &[("k", k), ("dst", dst)])?;
    util::check_contiguous(WRITE, &[("k", k), ("dst", dst)])?;
    if check_runs(WRITE, runs, ring_k.device())? == 0 {
        return Ok(());
    }
    ring_k.inplace_op2(k, &RingKeys { runs: runs.clone() })?;
    ring_m.inplace_op2(
        dst,
        &RingMeta {
            runs: runs.clone(),
            page_size,
        },
    )?;
    Ok(())
}

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
        let (m0, m1) = util::contiguous_range(MASS, ml)?;
        let (r0, r1) = util::contiguous_range(MASS, rl)?;
        let CpuStorage::U32(m) = m else {
            candle_core::bail!("{MASS}: ring_m must be u32");
        };
        let m = &mut m[m0..m1];
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
/// be in the ring already ([`infllm_ring_write`]).
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

struct MassAdd {
    owner: u32,
    first: usize,
}

impl InplaceOp2 for MassAdd {
    fn name(&self) -> &'static str {
        MASS_ADD
    }

    fn cpu_fwd(&self, m: &mut CpuStorage, ml: &Layout, a: &CpuStorage, al: &Layout) -> candle_core::Result<()> {
        let (s, _, w, h) = ml.shape().dims4()?;
        let add = util::float_values(MASS_ADD, a, al)?;
        let (m0, m1) = util::contiguous_range(MASS_ADD, ml)?;
        let CpuStorage::U32(m) = m else {
            candle_core::bail!("{MASS_ADD}: ring_m must be u32");
        };
        let o = self.owner as usize;
        if o >= s {
            candle_core::bail!("{MASS_ADD}: owner {o} out of range ({s} owners)");
        }
        let plane = w * h;
        for (i, x) in add.iter().enumerate() {
            let at = m0 + o * 4 * plane + plane + ((self.first + i / h) % w) * h + i % h;
            if at < m1 {
                m[at] = (f32::from_bits(m[at]) + x).to_bits();
            }
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        m: &mut candle_core::CudaStorage,
        ml: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
    ) -> candle_core::Result<()> {
        crate::ops::cuda::infllm::mass_add(m, ml, a, al, self.owner, self.first)
    }
}

/// Adds, in place, `add[i, h]` to the mass of key `first + i` (KV head `h`) of `owner`
/// in `ring_m`: the masses a caller computed itself (the long runs of a prefill, with
/// batched matrix products).
///
/// # Arguments
/// * `ring_m` — `[S, 4, ring, Hkv]` u32; `add` — `[L, Hkv]` f32, `L <= ring`.
pub fn infllm_mass_add(ring_m: &Tensor, add: &Tensor, owner: u32, first: usize) -> Result<()> {
    util::check_shape(
        MASS_ADD,
        "ring_m",
        ring_m,
        &[None, Some(4), None, None],
        "[S, 4, ring, Hkv]",
    )?;
    util::check_dtype(MASS_ADD, "ring_m", ring_m, &[DType::U32])?;
    let (s, _, w, h) = ring_m.dims4()?;
    util::check_shape(MASS_ADD, "add", add, &[None, Some(h)], &format!("[L <= {w}, {h}]"))?;
    util::check_dtype(MASS_ADD, "add", add, &[DType::F32])?;
    util::check_device(MASS_ADD, ring_m.device(), &[("add", add)])?;
    util::check_contiguous(MASS_ADD, &[("ring_m", ring_m), ("add", add)])?;
    if add.dim(0)? > w || owner as usize >= s {
        crate::invalid!(
            MASS_ADD,
            "add {:?} for owner {owner}: at most {w} keys and {s} owners",
            add.dims()
        );
    }
    ring_m.inplace_op2(add, &MassAdd { owner, first })?;
    Ok(())
}

struct Restore {
    owner: u32,
    start: u32,
}

impl candle_core::InplaceOp1 for Restore {
    fn name(&self) -> &'static str {
        RESTORE
    }

    fn cpu_fwd(&self, m: &mut CpuStorage, ml: &Layout) -> candle_core::Result<()> {
        let (_, _, w, h) = ml.shape().dims4()?;
        let (m0, m1) = util::contiguous_range(RESTORE, ml)?;
        let CpuStorage::U32(m) = m else {
            candle_core::bail!("{RESTORE}: ring_m must be u32");
        };
        let plane = w * h;
        let base = m0 + self.owner as usize * 4 * plane;
        if base + 4 * plane > m1 {
            candle_core::bail!("{RESTORE}: owner {} out of range", self.owner);
        }
        if m[base + 3 * plane] == self.start {
            m.copy_within(base + 2 * plane..base + 3 * plane, base + plane);
            m[base + 3 * plane] = NONE;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, m: &mut candle_core::CudaStorage, ml: &Layout) -> candle_core::Result<()> {
        crate::ops::cuda::infllm::restore(m, ml, self.owner, self.start)
    }
}

/// Rolls `owner`'s masses back, in place, when its latest ring write started at `start`
/// (the flag word says so, on the device): the undo plane is copied over the masses and
/// the flag cleared. Otherwise nothing changes — the write that step would have made never
/// ran (a failed capture), or an earlier step's snapshot is there.
///
/// # Arguments
/// * `ring_m` — `[S, 4, ring, Hkv]` u32 (one layer's).
pub fn infllm_restore(ring_m: &Tensor, owner: u32, start: usize) -> Result<()> {
    util::check_shape(
        RESTORE,
        "ring_m",
        ring_m,
        &[None, Some(4), None, None],
        "[S, 4, ring, Hkv]",
    )?;
    util::check_dtype(RESTORE, "ring_m", ring_m, &[DType::U32])?;
    util::check_contiguous(RESTORE, &[("ring_m", ring_m)])?;
    if owner as usize >= ring_m.dim(0)? || start >= NONE as usize {
        crate::invalid!(
            RESTORE,
            "owner {owner} or start {start} out of range for ring_m {:?}",
            ring_m.dims()
        );
    }
    ring_m.inplace_op1(&Restore {
        owner,
        start: start as u32,
    })?;
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

struct BlockScores {
    candidates: Tensor,
    rows: Tensor,
    geo: InfLlmGeometry,
}

impl CustomOp2 for BlockScores {
    fn name(&self) -> &'static str {
        SCORES
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        rep: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, hq, d) = ql.shape().dims3()?;
        let (slots, kpp, _) = pl.shape().dims3()?;
        let (_, h, n) = self.candidates.dims3()?;
        let geo = self.geo;
        let bp = geo.block_pages();
        let nb = n.div_ceil(bp);
        let g = hq / h;
        let cand = util::u32_field(SCORES, &self.candidates)?;
        let rows = read_runs(SCORES, &self.rows, usize::MAX, None)?;
        let qv = util::float_values(SCORES, q, ql)?;
        let rv = util::float_values(SCORES, rep, pl)?;
        let mut out = vec![f32::NEG_INFINITY; b * nb];
        out.par_chunks_mut(nb.max(1))
            .enumerate()
            .try_for_each(|(bi, dst)| -> candle_core::Result<()> {
                let [_, pos, live, _] = rows[bi];
                if live == 0 {
                    return Ok(());
                }
                let qsum: Vec<f32> = (0..h * d)
                    .map(|i| (0..g).map(|gi| qv[(bi * hq + (i / d) * g + gi) * d + i % d]).sum())
                    .collect();
                for (j, o) in dst.iter_mut().enumerate().take(geo.blocks_at(pos)) {
                    if (j + 1) * bp <= geo.sink_pages {
                        continue;
                    }
                    let mut total = 0f32;
                    let mut ok = true;
                    for hh in 0..h {
                        for r in 0..geo.repr {
                            let page = j * bp + r / kpp;
                            let slot = if page < n { cand[(bi * h + hh) * n + page] } else { NONE };
                            if slot == NONE {
                                ok = false;
                                continue;
                            }
                            if slot as usize >= slots {
                                candle_core::bail!("{SCORES}: candidate slot {slot} out of range ({slots} slots)");
                            }
                            let key = &rv[(slot as usize * kpp + r % kpp) * d..][..d];
                            total += key
                                .iter()
                                .zip(&qsum[hh * d..(hh + 1) * d])
                                .map(|(x, y)| x * y)
                                .sum::<f32>();
                        }
                    }
                    if ok {
                        *o = total / geo.repr as f32;
                    }
                }
                Ok(())
            })?;
        Ok((CpuStorage::F32(out), Shape::from_dims(&[b, nb])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        rep: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::infllm::block_scores(q, ql, rep, pl, &self.candidates, &self.rows, &self.geo)
    }
}

/// Scores each block of each decoding sequence: the mean over its representatives of
/// their dot products with the query, summed over all query heads. Blocks not yet
/// finalized at the row's position, blocks inside the sink, and padding rows (`n = 0`)
/// score `-inf`.
///
/// # Arguments
/// * `q` — `[B, Hq, D]` post-RoPE decode queries; `repr` — `[slots, kpp, D]`, q's dtype.
/// * `candidates` — `[B, Hkv, N]` u32 host slots of each row's pages in logical order.
/// * `rows` — `[B, 4]` u32 runs of the decode tokens: `(owner, position, n, row)`.
///
/// Returns `[B, ⌈N / block_pages⌉]` f32.
pub fn infllm_block_scores(
    q: &Tensor,
    repr: &Tensor,
    candidates: &Tensor,
    rows: &Tensor,
    geo: &InfLlmGeometry,
) -> Result<Tensor> {
    geo.check(SCORES)?;
    util::check_shape(SCORES, "q", q, &[None, None, None], "[B, Hq, D]")?;
    let (b, hq, d) = q.dims3()?;
    let kpp = geo.keys_per_page();
    util::check_shape(
        SCORES,
        "repr",
        repr,
        &[None, Some(kpp), Some(d)],
        &format!("[slots, {kpp}, {d}]"),
    )?;
    util::check_same_dtype(SCORES, ("q", q), ("repr", repr))?;
    util::check_dtype(SCORES, "q", q, util::FLOAT_DTYPES)?;
    util::check_shape(
        SCORES,
        "candidates",
        candidates,
        &[Some(b), None, None],
        &format!("[{b}, Hkv, N]"),
    )?;
    util::check_dtype(SCORES, "candidates", candidates, &[DType::U32])?;
    let (_, h, n) = candidates.dims3()?;
    if h == 0 || hq % h != 0 {
        crate::invalid!(
            SCORES,
            "q {:?} has {hq} heads, not a multiple of the {h} KV heads of candidates {:?}",
            q.dims(),
            candidates.dims()
        );
    }
    if check_runs(SCORES, rows, q.device())? != b {
        crate::invalid!(
            SCORES,
            "rows {:?} must hold one run per query row of q {:?}",
            rows.dims(),
            q.dims()
        );
    }
    util::check_device(SCORES, q.device(), &[("repr", repr), ("candidates", candidates)])?;
    util::check_contiguous(SCORES, &[("q", q), ("repr", repr), ("candidates", candidates)])?;
    let nb = n.div_ceil(geo.block_pages());
    if b == 0 || nb == 0 {
        return Ok(Tensor::full(f32::NEG_INFINITY, (b, nb), q.device())?);
    }
    let op = BlockScores {
        candidates: candidates.clone(),
        rows: rows.clone(),
        geo: *geo,
    };
    Ok(q.apply_op2_no_bwd(repr, &op)?)
}

struct Pages {
    rows: Tensor,
    geo: InfLlmGeometry,
    hkv: usize,
}

impl Pages {
    fn width(&self, k: usize) -> usize {
        self.geo.sink_pages + k * self.geo.block_pages() + self.geo.pending_pages()
    }
}

/// One row's pages (module docs of `partition::infllm`): the sink, the chosen blocks
/// (ascending), the pending pages; `top` are block ids, `NONE` padded.
pub(crate) fn row_pages(geo: &InfLlmGeometry, pos: usize, top: &[u32]) -> Vec<u32> {
    let (p, bp) = (geo.page_size, geo.block_pages());
    let np = (pos + 1).div_ceil(p);
    let blocks = geo.blocks_at(pos);
    let forced = blocks * bp;
    let mut ids: Vec<usize> = top
        .iter()
        .filter(|&&j| j != NONE)
        .map(|&j| j as usize)
        .filter(|&j| j < blocks)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut out: Vec<u32> = (0..geo.sink_pages.min(np) as u32).collect();
    for j in ids {
        out.extend(
            (j * bp..(j + 1) * bp)
                .filter(|&x| x >= geo.sink_pages && x < forced.min(np))
                .map(|x| x as u32),
        );
    }
    out.extend((forced.max(geo.sink_pages)..np).map(|x| x as u32));
    out
}

impl CustomOp1 for Pages {
    fn name(&self) -> &'static str {
        PAGES
    }

    fn cpu_fwd(&self, t: &CpuStorage, tl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, k) = tl.shape().dims2()?;
        let top = util::u32_slice(PAGES, t, tl)?;
        let rows = read_runs(PAGES, &self.rows, usize::MAX, None)?;
        let width = self.width(k);
        let mut out = vec![NONE; b * self.hkv * width];
        for (bi, chunk) in out.chunks_mut(self.hkv * width).enumerate() {
            let [_, pos, live, _] = rows[bi];
            if live == 0 {
                continue;
            }
            let pages = row_pages(&self.geo, pos, &top[bi * k..(bi + 1) * k]);
            if pages.len() > width {
                candle_core::bail!(
                    "{PAGES}: row {bi} needs {} pages, more than {width} (internal error)",
                    pages.len()
                );
            }
            for row in chunk.chunks_mut(width) {
                row[..pages.len()].copy_from_slice(&pages);
            }
        }
        Ok((CpuStorage::U32(out), Shape::from_dims(&[b, self.hkv, width])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        t: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (_, k) = tl.shape().dims2()?;
        crate::ops::cuda::infllm::pages(t, tl, &self.rows, &self.geo, self.hkv, self.width(k))
    }
}

/// The logical pages each decoding row attends: its sink pages, the pages of its chosen
/// blocks and its pending pages (past the finalized blocks), ascending, the same list for
/// every KV head; padding rows (`n = 0`) get none.
///
/// # Arguments
/// * `top` — `[B, k]` u32 chosen block ids ([`topk_indices`](super::topk_indices) of
///   [`infllm_block_scores`]), `NONE` padded.
/// * `rows` — `[B, 4]` u32 runs of the decode tokens.
///
/// Returns `[B, hkv, sink_pages + k · block_pages + pending_pages]` u32, `NONE` padded.
pub fn infllm_pages(top: &Tensor, rows: &Tensor, geo: &InfLlmGeometry, hkv: usize) -> Result<Tensor> {
    geo.check(PAGES)?;
    util::check_shape(PAGES, "top", top, &[None, None], "[B, k]")?;
    util::check_dtype(PAGES, "top", top, &[DType::U32])?;
    util::check_contiguous(PAGES, &[("top", top)])?;
    let (b, k) = top.dims2()?;
    if check_runs(PAGES, rows, top.device())? != b {
        crate::invalid!(
            PAGES,
            "rows {:?} must hold one run per row of top {:?}",
            rows.dims(),
            top.dims()
        );
    }
    if hkv == 0 || k == 0 {
        crate::invalid!(PAGES, "hkv ({hkv}) and k (top {:?}) must be >= 1", top.dims());
    }
    let op = Pages {
        rows: rows.clone(),
        geo: *geo,
        hkv,
    };
    if b == 0 {
        return Ok(Tensor::full(NONE, (0, hkv, op.width(k)), top.device())?);
    }
    Ok(top.apply_op1_no_bwd(&op)?)
}
