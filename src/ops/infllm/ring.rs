//! The ring's writes: a step's new tokens ([`infllm_ring_write`]), masses a caller
//! computed itself ([`infllm_mass_add`]) and the roll-back of an aborted step
//! ([`infllm_restore`]).

use super::{check_ring, check_runs, read_runs, ring_words, util, MASS_ADD, RESTORE, WRITE};
use crate::ops::NONE;
use crate::Result;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor};

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
        let m = ring_words(WRITE, m, ml)?;
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
        let m = ring_words(MASS_ADD, m, ml)?;
        let o = self.owner as usize;
        if o >= s {
            candle_core::bail!("{MASS_ADD}: owner {o} out of range ({s} owners)");
        }
        let plane = w * h;
        for (i, x) in add.iter().enumerate() {
            let at = o * 4 * plane + plane + ((self.first + i / h) % w) * h + i % h;
            if at < m.len() {
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
        let m = ring_words(RESTORE, m, ml)?;
        let plane = w * h;
        let base = self.owner as usize * 4 * plane;
        if base + 4 * plane > m.len() {
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
