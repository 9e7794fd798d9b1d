//! Paged append: writes a step's new K/V rows into their pages; the Quest metadata
//! update (element-wise min/max of post-RoPE keys per page); and the two fused
//! ([`paged_append_with_minmax`]: one kernel on CUDA, the two ops in sequence on the CPU).
//!
//! Pool layout, shared by every op: `pool[slot, 0, row, :]` is a key row and
//! `pool[slot, 1, row, :]` its value row, `row < page_size`. A destination is encoded as
//! `slot * page_size + row`; [`NONE`] skips the token (used for the
//! write-through into the fast tier when the page is not resident there).

use super::util::{self, Elem};
use super::{quest_q8, NONE};
use crate::Result;
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Tensor};

const APPEND: &str = "paged_append";
const META: &str = "quest_meta_update";

struct PagedAppend {
    dst: Tensor,
    page_size: usize,
}

fn append_cpu<T: Elem>(
    pool: &mut [T],
    k: &[T],
    v: &[T],
    dst: &[u32],
    page_size: usize,
    d: usize,
) -> candle_core::Result<()> {
    let slots = pool.len() / (2 * page_size * d);
    for (i, &code) in dst.iter().enumerate() {
        if code == NONE {
            continue;
        }
        let (slot, row) = (code as usize / page_size, code as usize % page_size);
        if slot >= slots {
            candle_core::bail!("{APPEND}: destination slot {slot} out of range (pool has {slots})");
        }
        let kb = (slot * 2 * page_size + row) * d;
        let vb = ((slot * 2 + 1) * page_size + row) * d;
        pool[kb..kb + d].copy_from_slice(&k[i * d..(i + 1) * d]);
        pool[vb..vb + d].copy_from_slice(&v[i * d..(i + 1) * d]);
    }
    Ok(())
}

impl InplaceOp3 for PagedAppend {
    fn name(&self) -> &'static str {
        APPEND
    }

    fn cpu_fwd(
        &self,
        pool: &mut CpuStorage,
        pl: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        let dst = util::u32_field(APPEND, &self.dst)?;
        let d = *kl.dims().last().unwrap_or(&1);
        let (p0, p1) = util::contiguous_range(APPEND, pl)?;
        let (k0, k1) = util::contiguous_range(APPEND, kl)?;
        let (v0, v1) = util::contiguous_range(APPEND, vl)?;
        util::with_float_storages!(APPEND, (pool, k, v) => |p, k, v| append_cpu(&mut p[p0..p1], &k[k0..k1], &v[v0..v1], &dst, self.page_size, d))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        pool: &mut candle_core::CudaStorage,
        pl: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        crate::ops::cuda::append::paged_append(pool, pl, k, kl, v, vl, &self.dst, self.page_size)
    }
}

/// Shapes and dtypes shared by the paged appends: `pool` `[slots, 2, P, D]` float, `k`
/// and `v` `[T, Hkv, D]` in the pool's dtype, the destinations `[T, Hkv]` u32. Returns
/// `(P, T)`.
fn check_pool_rows(
    op: &'static str,
    pool: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (dst_name, dst): (&str, &Tensor),
) -> Result<(usize, usize)> {
    util::check_shape(
        op,
        "pool",
        pool,
        &[None, Some(2), None, None],
        "[slots, 2, page_size, D]",
    )?;
    let (_, _, page_size, d) = pool.dims4()?;
    util::check_nonzero(op, "page_size", page_size, ("pool", pool))?;
    util::check_nonzero(op, "head dim D", d, ("pool", pool))?;
    util::check_dtype(op, "pool", pool, util::FLOAT_DTYPES)?;
    util::check_shape(op, "k", k, &[None, None, Some(d)], &format!("[T, Hkv, {d}]"))?;
    let (t, h, _) = k.dims3()?;
    util::check_shape(
        op,
        "v",
        v,
        &[Some(t), Some(h), Some(d)],
        &format!("[{t}, {h}, {d}] like k"),
    )?;
    util::check_shape(op, dst_name, dst, &[Some(t), Some(h)], &format!("[{t}, {h}]"))?;
    util::check_same_dtype(op, ("pool", pool), ("k", k))?;
    util::check_same_dtype(op, ("pool", pool), ("v", v))?;
    util::check_dtype(op, dst_name, dst, &[candle_core::DType::U32])?;
    Ok((page_size, t))
}

/// Writes `k` and `v` rows into `pool` pages, in place.
///
/// # Arguments
/// * `pool` — `[slots, 2, page_size, D]`, K at index 0 and V at index 1 of dim 1.
/// * `k`, `v` — `[T, Hkv, D]`, same dtype as `pool`.
/// * `dst` — `[T, Hkv]` u32: `slot * page_size + row` for each (token, head), or
///   [`NONE`] to skip. Every slot must be `< slots`.
pub fn paged_append(pool: &Tensor, k: &Tensor, v: &Tensor, dst: &Tensor) -> Result<()> {
    let (page_size, t) = check_pool_rows(APPEND, pool, k, v, ("dst", dst))?;
    util::check_device(APPEND, pool.device(), &[("k", k), ("v", v), ("dst", dst)])?;
    util::check_contiguous(APPEND, &[("pool", pool), ("k", k), ("v", v), ("dst", dst)])?;
    if t == 0 {
        return Ok(());
    }
    let op = PagedAppend {
        dst: dst.clone(),
        page_size,
    };
    pool.inplace_op3(k, v, &op)?;
    Ok(())
}

struct QuestMetaUpdate {
    dst: Tensor,
    page_size: usize,
}

fn meta_cpu<T: Elem>(meta: &mut [T], k: &[T], dst: &[u32], page_size: usize, d: usize) -> candle_core::Result<()> {
    let slots = meta.len() / (2 * d);
    for (i, &code) in dst.iter().enumerate() {
        if code == NONE {
            continue;
        }
        let (slot, row) = (code as usize / page_size, code as usize % page_size);
        if slot >= slots {
            candle_core::bail!("{META}: slot {slot} out of range (metadata has {slots} slots)");
        }
        let key = &k[i * d..(i + 1) * d];
        let (mins, maxs) = meta[slot * 2 * d..(slot + 1) * 2 * d].split_at_mut(d);
        if row == 0 {
            // First token of a fresh page: reset instead of widening stale bounds.
            mins.copy_from_slice(key);
            maxs.copy_from_slice(key);
        } else {
            for j in 0..d {
                let x = key[j].to_f32();
                if x < mins[j].to_f32() {
                    mins[j] = key[j];
                }
                if x > maxs[j].to_f32() {
                    maxs[j] = key[j];
                }
            }
        }
    }
    Ok(())
}

impl InplaceOp2 for QuestMetaUpdate {
    fn name(&self) -> &'static str {
        META
    }

    fn cpu_fwd(&self, meta: &mut CpuStorage, ml: &Layout, k: &CpuStorage, kl: &Layout) -> candle_core::Result<()> {
        let dst = util::u32_field(META, &self.dst)?;
        let d = *kl.dims().last().unwrap_or(&1);
        let (m0, m1) = util::contiguous_range(META, ml)?;
        let (k0, k1) = util::contiguous_range(META, kl)?;
        if let CpuStorage::U8(m) = meta {
            let m = &mut m[m0..m1];
            return match k {
                CpuStorage::F32(k) => quest_q8::update_cpu(m, &k[k0..k1], &dst, self.page_size, d),
                CpuStorage::F16(k) => quest_q8::update_cpu(m, &k[k0..k1], &dst, self.page_size, d),
                CpuStorage::BF16(k) => quest_q8::update_cpu(m, &k[k0..k1], &dst, self.page_size, d),
                _ => candle_core::bail!("{META}: k must be f32, f16 or bf16"),
            };
        }
        util::with_float_storages!(META, (meta, k) => |m, k| meta_cpu(&mut m[m0..m1], &k[k0..k1], &dst, self.page_size, d))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        meta: &mut candle_core::CudaStorage,
        ml: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
    ) -> candle_core::Result<()> {
        crate::ops::cuda::append::quest_meta_update(meta, ml, k, kl, &self.dst, self.page_size)
    }
}

/// Updates Quest page metadata with new post-RoPE keys, in place: for each (token, head)
/// the page's element-wise `min` and `max` are widened (reset when `row == 0`).
///
/// Tokens must arrive in order within a page (row 0 first), as the cache guarantees.
///
/// # Arguments
/// * `meta` — `[slots, 2, D]` in `k`'s dtype: `meta[s, 0]` = min, `meta[s, 1]` = max of
///   page slot `s`; or int8 bounds `[slots, 2·D + 16]` u8 ([`quest_q8`]: widened with
///   outward rounding, exactly the quantized exact bounds).
/// * `k` — `[T, Hkv, D]` post-RoPE keys (f32, f16 or bf16).
/// * `dst` — `[T, Hkv]` u32: `slot * page_size + row`, or [`NONE`] to skip.
/// * `page_size` — tokens per page.
pub fn quest_meta_update(meta: &Tensor, k: &Tensor, dst: &Tensor, page_size: usize) -> Result<()> {
    util::check_shape(META, "k", k, &[None, None, None], "[T, Hkv, D]")?;
    let (t, h, d) = k.dims3()?;
    util::check_nonzero(META, "head dim D", d, ("k", k))?;
    util::check_dtype(META, "k", k, util::FLOAT_DTYPES)?;
    quest_q8::check_bounds(META, meta, d, ("k", k))?;
    util::check_shape(META, "dst", dst, &[Some(t), Some(h)], &format!("[{t}, {h}]"))?;
    util::check_dtype(META, "dst", dst, &[candle_core::DType::U32])?;
    util::check_device(META, meta.device(), &[("k", k), ("dst", dst)])?;
    util::check_contiguous(META, &[("meta", meta), ("k", k), ("dst", dst)])?;
    if page_size == 0 {
        crate::invalid!(
            META,
            "page_size must be >= 1, got 0 (meta {:?}, k {:?})",
            meta.dims(),
            k.dims()
        );
    }
    if t == 0 {
        return Ok(());
    }
    meta.inplace_op2(
        k,
        &QuestMetaUpdate {
            dst: dst.clone(),
            page_size,
        },
    )?;
    Ok(())
}

const FUSED: &str = "paged_append_with_minmax";

/// The fused op (CUDA only): `pool` is the in-place destination, `meta` is written through
/// its device address by the same kernel.
#[cfg(feature = "cuda")]
struct PagedAppendMinMax {
    pool_dst: Tensor,
    meta: Tensor,
    meta_dst: Tensor,
}

#[cfg(feature = "cuda")]
impl InplaceOp3 for PagedAppendMinMax {
    fn name(&self) -> &'static str {
        FUSED
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        // `paged_append_with_minmax` runs the two reference ops on the CPU and builds
        // this op only for CUDA tensors.
        candle_core::bail!("{FUSED}: the fused op is CUDA-only; on the CPU call paged_append_with_minmax")
    }

    fn cuda_fwd(
        &self,
        pool: &mut candle_core::CudaStorage,
        pl: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        crate::ops::cuda::append::paged_append_minmax(
            pool,
            pl,
            k,
            kl,
            v,
            vl,
            &self.pool_dst,
            &self.meta,
            &self.meta_dst,
        )
    }
}

/// [`paged_append`] into `pool` and [`quest_meta_update`] of `meta` with the same keys, in
/// place — on CUDA one fused kernel (each key row is read once for both), on the CPU the
/// two ops in sequence (the reference).
///
/// The two destinations index different slot spaces: the cache writes through to the
/// fast tier (`pool_dst`: fast-tier slots, [`NONE`] where the page is not resident)
/// while the metadata, keyed by host slot, is updated for every token (`meta_dst`).
///
/// # Arguments
/// * `pool` — `[slots, 2, page_size, D]`; its `page_size` is also the metadata's.
/// * `k`, `v` — `[T, Hkv, D]` (post-RoPE keys), same dtype as `pool`.
/// * `pool_dst` — `[T, Hkv]` u32: `slot * page_size + row` in `pool`, or [`NONE`].
/// * `meta` — `[meta_slots, 2, D]` min/max per page slot in `pool`'s dtype, or int8
///   bounds `[meta_slots, 2·D + 16]` u8 ([`quest_q8`]); on `pool`'s device,
///   sharing no buffer with `pool`, `k` or `v`; tokens of one metadata slot arrive in
///   order (row 0 first), as for [`quest_meta_update`].
/// * `meta_dst` — `[T, Hkv]` u32: `meta_slot * page_size + row`, or [`NONE`].
pub fn paged_append_with_minmax(
    pool: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pool_dst: &Tensor,
    meta: &Tensor,
    meta_dst: &Tensor,
) -> Result<()> {
    let (page_size, t) = check_pool_rows(FUSED, pool, k, v, ("pool_dst", pool_dst))?;
    let (h, d) = (k.dims()[1], k.dims()[2]);
    quest_q8::check_bounds(FUSED, meta, d, ("pool", pool))?;
    util::check_shape(FUSED, "meta_dst", meta_dst, &[Some(t), Some(h)], &format!("[{t}, {h}]"))?;
    util::check_dtype(FUSED, "meta_dst", meta_dst, &[candle_core::DType::U32])?;
    util::check_device(
        FUSED,
        pool.device(),
        &[
            ("k", k),
            ("v", v),
            ("pool_dst", pool_dst),
            ("meta", meta),
            ("meta_dst", meta_dst),
        ],
    )?;
    util::check_contiguous(
        FUSED,
        &[
            ("pool", pool),
            ("k", k),
            ("v", v),
            ("pool_dst", pool_dst),
            ("meta", meta),
            ("meta_dst", meta_dst),
        ],
    )?;
    if t == 0 {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    if pool.device().is_cuda() {
        let m = crate::ops::cuda::append::buffer_range(FUSED, meta)?;
        for (name, x) in [("pool", pool), ("k", k), ("v", v)] {
            let o = crate::ops::cuda::append::buffer_range(FUSED, x)?;
            if m.0 < o.1 && o.0 < m.1 {
                crate::invalid!(
                    FUSED,
                    "meta {:?} shares a device buffer with {name} {:?}",
                    meta.dims(),
                    x.dims()
                );
            }
        }
        let op = PagedAppendMinMax {
            pool_dst: pool_dst.clone(),
            meta: meta.clone(),
            meta_dst: meta_dst.clone(),
        };
        pool.inplace_op3(k, v, &op)?;
        return Ok(());
    }
    paged_append(pool, k, v, pool_dst)?;
    quest_meta_update(meta, k, meta_dst, page_size)
}
