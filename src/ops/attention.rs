//! Sparse paged decode attention: each query token attends to a list of page slots per
//! KV head (its sequence's selected pages), with GQA query heads sharing their KV head.
//!
//! The op returns a *partial* attention state — the normalized output and the
//! log-sum-exp of each row — so that attention over several page lists (rounds through a
//! small fast tier, or the paged part plus the in-step causal part of a prefill) can be
//! combined exactly with [`merge_partials`](super::merge_partials).

use super::util::{self, Elem};
use super::{EMPTY_LSE, NONE};
use crate::Result;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

const OP: &str = "sparse_paged_attention";

/// The page lists and query placement of one attention call (all u32 tensors on the
/// device of the pool).
#[derive(Debug, Clone)]
pub struct PageList {
    /// `[S, Hkv, N, 2]`: for sequence `s` and KV head `h`, entry `n` is
    /// `(fast-tier slot, logical page number)`; `(NONE, _)` pads the list.
    pub pages: Tensor,
    /// `[T, 2]`: for each query token, `(sequence index s < S, token position)`.
    pub queries: Tensor,
    /// `[S]`: keys at positions `>= kv_limit[s]` are masked out (together with the causal
    /// mask `key_pos <= query_pos`).
    pub kv_limit: Tensor,
}

/// Attention output before normalization across partials.
#[derive(Debug, Clone)]
pub struct AttentionPartial {
    /// `[T, Hq, D]` f32: softmax-weighted values over the attended keys.
    pub out: Tensor,
    /// `[T, Hq]` f32: log-sum-exp of the scaled scores; [`EMPTY_LSE`] where nothing was
    /// attended.
    pub lse: Tensor,
}

struct SparsePagedAttention {
    list: PageList,
    scale: f32,
}

struct Dims {
    t: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    s: usize,
    n: usize,
    page_size: usize,
}

#[allow(clippy::too_many_arguments)]
fn attention_cpu<T: Elem>(
    q: &[T],
    pool: &[T],
    pages: &[u32],
    queries: &[u32],
    kv_limit: &[u32],
    dims: &Dims,
    scale: f32,
) -> candle_core::Result<Vec<f32>> {
    let Dims {
        t,
        hq,
        hkv,
        d,
        s,
        n,
        page_size,
    } = *dims;
    let g = hq / hkv;
    let slots = pool.len() / (2 * page_size * d);
    let row = d + 1;
    let mut out = vec![0f32; t * hq * row];
    // One task per (token, kv head): its g query heads share every key row read.
    out.par_chunks_mut(g * row)
        .enumerate()
        .try_for_each(|(task, dst)| -> candle_core::Result<()> {
            let (ti, h) = (task / hkv, task % hkv);
            let (seq, pos) = (queries[2 * ti] as usize, queries[2 * ti + 1] as usize);
            if seq >= s {
                candle_core::bail!("{OP}: query {ti} names sequence {seq} but only {s} sequences");
            }
            let limit = (kv_limit[seq] as usize).min(pos + 1);
            let qs: Vec<f32> = (0..g)
                .flat_map(|j| q[(ti * hq + h * g + j) * d..][..d].iter().map(|x| x.to_f32() * scale))
                .collect();
            let mut m = vec![f32::NEG_INFINITY; g];
            let mut l = vec![0f32; g];
            let mut acc = vec![0f32; g * d];
            let list = &pages[(seq * hkv + h) * n * 2..][..n * 2];
            for e in 0..n {
                let (slot, lp) = (list[2 * e], list[2 * e + 1] as usize);
                if slot == NONE {
                    continue;
                }
                let slot = slot as usize;
                if slot >= slots {
                    candle_core::bail!("{OP}: page slot {slot} out of range (pool has {slots})");
                }
                let first = lp * page_size;
                if first >= limit {
                    continue;
                }
                let rows = (limit - first).min(page_size);
                let kbase = slot * 2 * page_size * d;
                let vbase = kbase + page_size * d;
                for r in 0..rows {
                    let key = &pool[kbase + r * d..][..d];
                    let val = &pool[vbase + r * d..][..d];
                    for j in 0..g {
                        let qj = &qs[j * d..(j + 1) * d];
                        let mut sc = 0f32;
                        for x in 0..d {
                            sc += qj[x] * key[x].to_f32();
                        }
                        let m_new = m[j].max(sc);
                        let corr = (m[j] - m_new).exp();
                        let p = (sc - m_new).exp();
                        l[j] = l[j] * corr + p;
                        let a = &mut acc[j * d..(j + 1) * d];
                        for x in 0..d {
                            a[x] = a[x] * corr + p * val[x].to_f32();
                        }
                        m[j] = m_new;
                    }
                }
            }
            for j in 0..g {
                let o = &mut dst[j * row..(j + 1) * row];
                if l[j] > 0.0 {
                    for x in 0..d {
                        o[x] = acc[j * d + x] / l[j];
                    }
                    o[d] = m[j] + l[j].ln();
                } else {
                    o[d] = EMPTY_LSE;
                }
            }
            Ok(())
        })?;
    Ok(out)
}

impl CustomOp2 for SparsePagedAttention {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        pool: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, hq, d) = ql.shape().dims3()?;
        let (_, _, page_size, _) = pl.shape().dims4()?;
        let (s, hkv, n, _) = self.list.pages.dims4()?;
        let dims = Dims {
            t,
            hq,
            hkv,
            d,
            s,
            n,
            page_size,
        };
        let pages = util::u32_field(OP, &self.list.pages)?;
        let queries = util::u32_field(OP, &self.list.queries)?;
        let kv_limit = util::u32_field(OP, &self.list.kv_limit)?;
        let (q0, q1) = util::contiguous_range(OP, ql)?;
        let (p0, p1) = util::contiguous_range(OP, pl)?;
        let out = util::with_float_storages!(OP, (q, pool) => |q, p| attention_cpu(&q[q0..q1], &p[p0..p1], &pages, &queries, &kv_limit, &dims, self.scale)?);
        Ok((CpuStorage::F32(out), Shape::from_dims(&[t, hq, d + 1])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        pool: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::attention::sparse_paged_attention(q, ql, pool, pl, &self.list, self.scale)
    }
}

/// Attention of each query token over its sequence's page list, per KV head.
///
/// # Arguments
/// * `q` — `[T, Hq, D]` post-RoPE queries (f32, f16 or bf16); `Hq` a multiple of `Hkv`,
///   query head `i` reads KV head `i / (Hq / Hkv)`.
/// * `pool` — `[slots, 2, page_size, D]` fast-tier pages, same dtype as `q`.
/// * `list` — page lists `[S, Hkv, N, 2]`, query placement `[T, 2]`, key limits `[S]`.
/// * `scale` — score scale, usually `1/sqrt(D)`.
///
/// Returns the partial state: `out` `[T, Hq, D]` f32 and `lse` `[T, Hq]` f32. A row with no
/// visible key gets `out = 0`, `lse = EMPTY_LSE`.
pub fn sparse_paged_attention(q: &Tensor, pool: &Tensor, list: &PageList, scale: f32) -> Result<AttentionPartial> {
    check_pool_and_list(OP, q, ("pool", pool), list)?;
    let (t, hq, d) = q.dims3()?;
    if t == 0 {
        return empty_partial(q);
    }
    let packed = q.apply_op2_no_bwd(
        pool,
        &SparsePagedAttention {
            list: list.clone(),
            scale,
        },
    )?;
    unpack(&packed, t, hq, d)
}

/// Validates `q` `[T, Hq, D]` (a float dtype), the page pool `name` `[slots, 2,
/// page_size, D]` (same dtype, page_size > 0, contiguous) and the page list against them,
/// for `op`; shared with the tiered attention, whose fast pool is checked here.
pub(crate) fn check_pool_and_list(
    op: &'static str,
    q: &Tensor,
    (name, pool): (&str, &Tensor),
    list: &PageList,
) -> Result<()> {
    util::check_shape(op, "q", q, &[None, None, None], "[T, Hq, D]")?;
    let d = q.dims()[2];
    util::check_dtype(op, "q", q, util::FLOAT_DTYPES)?;
    util::check_shape(
        op,
        name,
        pool,
        &[None, Some(2), None, Some(d)],
        &format!("[slots, 2, page_size, {d}]"),
    )?;
    util::check_nonzero(op, "page_size", pool.dims()[2], (name, pool))?;
    util::check_same_dtype(op, ("q", q), (name, pool))?;
    check_query_and_list(q, list, pool.device())?;
    util::check_contiguous(op, &[(name, pool)])?;
    Ok(())
}

/// Validates `q` `[T, Hq, D]` and the page list against it (shapes, u32 dtypes, all on
/// `device`, contiguous); shared with the attention over the pinned host tier.
pub(crate) fn check_query_and_list(q: &Tensor, list: &PageList, device: &candle_core::Device) -> Result<()> {
    util::check_shape(OP, "q", q, &[None, None, None], "[T, Hq, D]")?;
    let (t, hq, d) = q.dims3()?;
    util::check_nonzero(OP, "head dim D", d, ("q", q))?;
    util::check_nonzero(OP, "query heads Hq", hq, ("q", q))?;
    util::check_dtype(OP, "q", q, util::FLOAT_DTYPES)?;
    util::check_shape(OP, "pages", &list.pages, &[None, None, None, Some(2)], "[S, Hkv, N, 2]")?;
    let (s, hkv, _, _) = list.pages.dims4()?;
    if hkv == 0 || hq % hkv != 0 {
        crate::invalid!(
            OP,
            "q has {hq} heads (shape {:?}), not a multiple of the {hkv} KV heads of pages {:?}",
            q.dims(),
            list.pages.dims()
        );
    }
    util::check_shape(OP, "queries", &list.queries, &[Some(t), Some(2)], &format!("[{t}, 2]"))?;
    util::check_shape(OP, "kv_limit", &list.kv_limit, &[Some(s)], &format!("[{s}]"))?;
    for (name, x) in [
        ("pages", &list.pages),
        ("queries", &list.queries),
        ("kv_limit", &list.kv_limit),
    ] {
        util::check_dtype(OP, name, x, &[DType::U32])?;
    }
    util::check_device(
        OP,
        device,
        &[
            ("q", q),
            ("pages", &list.pages),
            ("queries", &list.queries),
            ("kv_limit", &list.kv_limit),
        ],
    )?;
    util::check_contiguous(
        OP,
        &[
            ("q", q),
            ("pages", &list.pages),
            ("queries", &list.queries),
            ("kv_limit", &list.kv_limit),
        ],
    )?;
    Ok(())
}

/// The partial state of zero query tokens: `out` `[0, Hq, D]`, `lse` `[0, Hq]`.
pub(crate) fn empty_partial(q: &Tensor) -> Result<AttentionPartial> {
    let (_, hq, d) = q.dims3()?;
    let out = Tensor::zeros((0, hq, d), DType::F32, q.device())?;
    let lse = Tensor::zeros((0, hq), DType::F32, q.device())?;
    Ok(AttentionPartial { out, lse })
}

/// Splits the op's packed output into `out` `[T, Hq, D]` and `lse` `[T, Hq]`.
pub(crate) fn unpack(packed: &Tensor, t: usize, hq: usize, d: usize) -> Result<AttentionPartial> {
    if packed.rank() == 1 {
        // CUDA layout: flat [T·Hq·D outputs, then T·Hq lse], both halves contiguous views.
        return Ok(AttentionPartial {
            out: packed.narrow(0, 0, t * hq * d)?.reshape((t, hq, d))?,
            lse: packed.narrow(0, t * hq * d, t * hq)?.reshape((t, hq))?,
        });
    }
    Ok(AttentionPartial {
        out: packed.narrow(2, 0, d)?.contiguous()?,
        lse: packed.narrow(2, d, 1)?.squeeze(2)?.contiguous()?,
    })
}
