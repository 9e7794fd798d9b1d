//! Prefill attention: the query rows of prefill chunks attend, in one pass with an online
//! softmax, their sequence's earlier pages (a page list over the fast tier) and then the
//! chunk's own tokens causally. `cpu_fwd` is the plain reference (scores in f64);
//! `cuda_fwd` is the tensor-core kernel of `kernels/prefill.cu`.
//!
//! The work is cut into [`PrefillTiles`]: each tile holds the (token, query head) rows of
//! up to [`PREFILL_ROWS`]` / g` consecutive tokens of one chunk (`g` query heads per KV
//! head), so that all heads of a GQA group share every K/V tile the kernel loads.

use super::attention::{self, AttentionPartial};
use super::kernel_consts::{PREFILL_ROWS, PREFILL_TILE_WORDS};
use super::util;
use super::{EMPTY_LSE, NONE};
use crate::Result;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};

const OP: &str = "prefill_attention";

/// One prefill chunk of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillChunk {
    /// Its index into the page lists and `kv_limit` (the `S` axis).
    pub seq: u32,
    /// Step row of its first token in `q`, `k` and `v`.
    pub row: u32,
    /// Position of its first token (its sequence's length before the chunk).
    pub start: u32,
    /// Its tokens (at least one).
    pub n: u32,
    /// Entries of its page list to walk (its earlier pages; at most the list's `N`).
    pub list_len: u32,
}

/// The tiles of a step's prefill chunks, on the device: `[NT, 6]` u32, one row
/// `(seq, row, start, tok0, ntok, list_len)` per tile, the costliest tiles first.
#[derive(Debug, Clone)]
pub struct PrefillTiles {
    tiles: Tensor,
    group: usize,
    /// One past the last step row any chunk covers.
    rows_end: usize,
    /// One past the largest `seq`.
    seqs_end: usize,
    /// Keys the tiles walk over earlier pages, summed over tiles (a tile's rows share them).
    prefix_keys: u64,
    /// Keys the tiles walk over their chunks' own tokens, summed over tiles.
    own_keys: u64,
}

impl PrefillTiles {
    /// Cuts `chunks` into tiles for a model with `group` query heads per KV head and
    /// pages of `page_size` tokens (used only to order the tiles by their work).
    pub fn new(chunks: &[PrefillChunk], group: usize, page_size: usize, device: &Device) -> Result<Self> {
        if group == 0 || group > PREFILL_ROWS {
            crate::invalid!(
                OP,
                "GQA group of {group} query heads per KV head: must be 1..={PREFILL_ROWS}"
            );
        }
        let per_tile = (PREFILL_ROWS / group) as u32;
        let mut rows: Vec<(u64, [u32; PREFILL_TILE_WORDS])> = Vec::new();
        let (mut rows_end, mut seqs_end) = (0usize, 0usize);
        let (mut prefix_keys, mut own_keys) = (0u64, 0u64);
        for c in chunks {
            let end = c.row as u64 + c.n as u64;
            if c.n == 0 || c.start.checked_add(c.n).is_none() || end > u32::MAX as u64 {
                crate::invalid!(
                    OP,
                    "chunk {c:?}: needs at least one token and positions and rows within u32"
                );
            }
            rows_end = rows_end.max(end as usize);
            seqs_end = seqs_end.max(c.seq as usize + 1);
            let mut tok0 = 0;
            while tok0 < c.n {
                let ntok = per_tile.min(c.n - tok0);
                let (prefix, own) = (c.list_len as u64 * page_size as u64, (tok0 + ntok) as u64);
                prefix_keys += prefix;
                own_keys += own;
                let work = prefix + own;
                rows.push((work, [c.seq, c.row, c.start, tok0, ntok, c.list_len]));
                tok0 += ntok;
            }
        }
        rows.sort_by_key(|r| std::cmp::Reverse(r.0));
        let n = rows.len();
        let flat: Vec<u32> = rows.into_iter().flat_map(|(_, w)| w).collect();
        Ok(Self {
            tiles: Tensor::from_vec(flat, (n, PREFILL_TILE_WORDS), device)?,
            group,
            rows_end,
            seqs_end,
            prefix_keys,
            own_keys,
        })
    }

    /// `[NT, 6]` u32 tile words.
    pub fn tiles(&self) -> &Tensor {
        &self.tiles
    }

    /// Number of tiles.
    pub fn len(&self) -> usize {
        self.tiles.dims()[0]
    }

    /// Whether there is no tile (no chunk).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether most of the keys the tiles walk are earlier pages rather than the chunks'
    /// own tokens (later chunks of a long prompt). There, every tile of a launch is about
    /// as long, and the CUDA kernel's warpgroup ping-pong pays; over own tokens alone
    /// (tiles of uneven length) it costs.
    pub fn mostly_earlier_pages(&self) -> bool {
        self.prefix_keys > self.own_keys
    }
}

/// Whether [`prefill_attention`] runs for `dtype` and `head_dim` on `device` (CPU: f32,
/// f16 and bf16, any head dim; CUDA: f16 and bf16 with head dim 64, 96 or 128).
pub fn prefill_attention_supported(dtype: DType, head_dim: usize, device: &Device) -> bool {
    match device {
        Device::Cpu => util::FLOAT_DTYPES.contains(&dtype),
        Device::Cuda(_) => matches!(dtype, DType::BF16 | DType::F16) && matches!(head_dim, 64 | 96 | 128),
        _ => false,
    }
}

struct PrefillAttention {
    pool: Tensor,
    pages: Tensor,
    kv_limit: Tensor,
    tiles: Tensor,
    /// [`PrefillTiles::mostly_earlier_pages`], for the CUDA kernel's choice.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    mostly_earlier_pages: bool,
    scale: f32,
}

impl PrefillAttention {
    /// The reference: per tile row, the scores of every visible key in f64, then the
    /// normalized output and the lse. Rows no tile covers get zeros and `EMPTY_LSE`.
    fn reference(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: (usize, usize, usize, usize),
    ) -> candle_core::Result<Vec<f32>> {
        let (t, hq, hkv, d) = dims;
        let pool = util::float_field(OP, "pool", &self.pool)?;
        let (slots, _, p, _) = self.pool.dims4()?;
        let (s, _, n, _) = self.pages.dims4()?;
        let pages = util::u32_field(OP, &self.pages)?;
        let kv_limit = util::u32_field(OP, &self.kv_limit)?;
        let tiles = util::u32_field(OP, &self.tiles)?;
        let g = hq / hkv;
        let mut out = vec![0f32; t * hq * (d + 1)];
        for row in out.chunks_mut(d + 1) {
            row[d] = EMPTY_LSE;
        }
        for w in tiles.chunks(PREFILL_TILE_WORDS) {
            let [seq, row0, start, tok0, ntok, list_len] = [w[0], w[1], w[2], w[3], w[4], w[5]].map(|x| x as usize);
            if seq >= s {
                candle_core::bail!("{OP}: tile {w:?} names sequence {seq} but the lists have {s}");
            }
            let limit = kv_limit[seq] as usize;
            for h in 0..hkv {
                // Visible keys of the tile's first token onwards: (key row, value row, position).
                let mut keys: Vec<(&[f32], &[f32], usize)> = Vec::new();
                let list = &pages[(seq * hkv + h) * n * 2..][..n * 2];
                for e in 0..list_len.min(n) {
                    let (slot, lp) = (list[2 * e], list[2 * e + 1] as usize);
                    if slot == NONE {
                        continue;
                    }
                    if slot as usize >= slots {
                        candle_core::bail!("{OP}: page slot {slot} out of range (pool has {slots})");
                    }
                    let base = slot as usize * 2 * p * d;
                    for r in 0..p {
                        if lp * p + r < limit {
                            keys.push((&pool[base + r * d..][..d], &pool[base + (p + r) * d..][..d], lp * p + r));
                        }
                    }
                }
                for i in 0..tok0 + ntok {
                    let at = ((row0 + i) * hkv + h) * d;
                    keys.push((&k[at..at + d], &v[at..at + d], start + i));
                }
                for tok in tok0..tok0 + ntok {
                    let qpos = start + tok;
                    for j in 0..g {
                        let qr = (row0 + tok) * hq + h * g + j;
                        let qv = &q[qr * d..][..d];
                        let scores: Vec<(f64, &[f32])> = keys
                            .iter()
                            .filter(|key| key.2 <= qpos)
                            .map(|(kr, vr, _)| {
                                let dot: f64 = qv.iter().zip(kr.iter()).map(|(a, b)| *a as f64 * *b as f64).sum();
                                (dot * self.scale as f64, *vr)
                            })
                            .collect();
                        let dst = &mut out[qr * (d + 1)..][..d + 1];
                        if scores.is_empty() {
                            continue;
                        }
                        let m = scores.iter().fold(f64::NEG_INFINITY, |a, s| a.max(s.0));
                        let mut acc = vec![0f64; d];
                        let mut l = 0f64;
                        for (sc, vr) in &scores {
                            let w = (sc - m).exp();
                            l += w;
                            for (a, x) in acc.iter_mut().zip(vr.iter()) {
                                *a += w * *x as f64;
                            }
                        }
                        for (o, a) in dst.iter_mut().zip(&acc) {
                            *o = (a / l) as f32;
                        }
                        dst[d] = (m + l.ln()) as f32;
                    }
                }
            }
        }
        Ok(out)
    }
}

impl CustomOp3 for PrefillAttention {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, hq, d) = ql.shape().dims3()?;
        let hkv = kl.shape().dims3()?.1;
        let (q, k, v) = (
            util::float_values(OP, q, ql)?,
            util::float_values(OP, k, kl)?,
            util::float_values(OP, v, vl)?,
        );
        let out = self.reference(&q, &k, &v, (t, hq, hkv, d))?;
        Ok((CpuStorage::F32(out), Shape::from_dims(&[t, hq, d + 1])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::prefill::prefill_attention(
            (q, ql),
            (k, kl),
            (v, vl),
            crate::ops::cuda::prefill::Fields {
                pool: &self.pool,
                pages: &self.pages,
                kv_limit: &self.kv_limit,
                tiles: &self.tiles,
                mostly_earlier_pages: self.mostly_earlier_pages,
            },
            self.scale,
        )
    }
}

/// Attention of the prefill chunks' query rows over their earlier pages and, causally,
/// over their own tokens.
///
/// # Arguments
/// * `q` — `[T, Hq, D]` post-RoPE queries of the step (f32, f16 or bf16).
/// * `k`, `v` — `[T, Hkv, D]` the step's post-RoPE keys and its values, same dtype.
/// * `pool` — `[slots, 2, page_size, D]` fast-tier pages, same dtype.
/// * `pages` — `[S, Hkv, N, 2]` u32 page lists `(fast slot, logical page)`, `NONE` slots
///   skipped; a chunk walks the first `list_len` entries of its sequence's list.
/// * `kv_limit` — `[S]` u32: list keys at positions `>= kv_limit[seq]` are masked (a
///   chunk's own tokens come from `k`/`v`, not from the list).
/// * `tiles` — the chunks, from [`PrefillTiles::new`] with `group = Hq / Hkv`.
/// * `scale` — score scale, usually `1/sqrt(D)`.
///
/// Returns `out` `[T, Hq, D]` f32 and `lse` `[T, Hq]` f32; rows that no chunk covers get
/// `out = 0`, `lse = EMPTY_LSE` (they merge as nothing).
#[allow(clippy::too_many_arguments)]
pub fn prefill_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pool: &Tensor,
    pages: &Tensor,
    kv_limit: &Tensor,
    tiles: &PrefillTiles,
    scale: f32,
) -> Result<AttentionPartial> {
    util::check_shape(OP, "q", q, &[None, None, None], "[T, Hq, D]")?;
    let (t, hq, d) = q.dims3()?;
    util::check_nonzero(OP, "head dim D", d, ("q", q))?;
    util::check_shape(OP, "k", k, &[Some(t), None, Some(d)], &format!("[{t}, Hkv, {d}]"))?;
    let hkv = k.dims()[1];
    util::check_shape(
        OP,
        "v",
        v,
        &[Some(t), Some(hkv), Some(d)],
        &format!("[{t}, {hkv}, {d}]"),
    )?;
    if hkv == 0 || hq % hkv != 0 || hq / hkv != tiles.group {
        crate::invalid!(
            OP,
            "q {:?} and k {:?}: Hq must be a multiple of Hkv, with Hq / Hkv = {} (the tiles' group)",
            q.dims(),
            k.dims(),
            tiles.group
        );
    }
    util::check_shape(
        OP,
        "pool",
        pool,
        &[None, Some(2), None, Some(d)],
        &format!("[slots, 2, page_size, {d}]"),
    )?;
    util::check_nonzero(OP, "page_size", pool.dims()[2], ("pool", pool))?;
    util::check_shape(
        OP,
        "pages",
        pages,
        &[None, Some(hkv), None, Some(2)],
        &format!("[S, {hkv}, N, 2]"),
    )?;
    let s = pages.dims()[0];
    util::check_shape(OP, "kv_limit", kv_limit, &[Some(s)], &format!("[{s}]"))?;
    util::check_dtype(OP, "q", q, util::FLOAT_DTYPES)?;
    for (name, x) in [("k", k), ("v", v), ("pool", pool)] {
        util::check_same_dtype(OP, ("q", q), (name, x))?;
    }
    for (name, x) in [("pages", pages), ("kv_limit", kv_limit)] {
        util::check_dtype(OP, name, x, &[DType::U32])?;
    }
    let all = [
        ("k", k),
        ("v", v),
        ("pool", pool),
        ("pages", pages),
        ("kv_limit", kv_limit),
        ("tiles", &tiles.tiles),
    ];
    util::check_device(OP, q.device(), &all)?;
    util::check_contiguous(OP, &all)?;
    util::check_contiguous(OP, &[("q", q)])?;
    if tiles.rows_end > t || tiles.seqs_end > s {
        crate::invalid!(
            OP,
            "the tiles cover step rows up to {} and sequences up to {}, but q is {:?} and pages {:?}",
            tiles.rows_end,
            tiles.seqs_end,
            q.dims(),
            pages.dims()
        );
    }
    if !prefill_attention_supported(q.dtype(), d, q.device()) {
        crate::invalid!(
            OP,
            "q {:?} {:?} on {:?}: CUDA runs f16/bf16 with head dim 64, 96 or 128",
            q.dims(),
            q.dtype(),
            q.device().location()
        );
    }
    if t == 0 {
        return attention::empty_partial(q);
    }
    let op = PrefillAttention {
        pool: pool.clone(),
        pages: pages.clone(),
        kv_limit: kv_limit.clone(),
        tiles: tiles.tiles.clone(),
        mostly_earlier_pages: tiles.mostly_earlier_pages(),
        scale,
    };
    let packed = q.apply_op3_no_bwd(k, v, &op)?;
    attention::unpack(&packed, t, hq, d)
}
