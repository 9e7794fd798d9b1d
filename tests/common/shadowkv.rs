//! Random inputs for ShadowKV's device ops (`spinkv::ops::shadowkv`): rows with a
//! padding row and an owner with nothing compressed, candidates `NONE`-padded past each
//! row's pages, outlier flags and ids, chosen chunks, factor tables and a value pool.

use super::{randn, rng};
use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;
use spinkv::ops::{ShadowKvGeometry, NONE};

/// Sizes of a case.
#[derive(Debug, Clone, Copy)]
pub struct SkvSizes {
    pub dtype: DType,
    pub b: usize,
    pub hkv: usize,
    pub g: usize,
    pub d: usize,
    pub p: usize,
    pub r: usize,
    pub k: usize,
}

/// One case's inputs, on the CPU.
pub struct SkvCase {
    pub sizes: SkvSizes,
    pub geo: ShadowKvGeometry,
    /// `[B, Hq, D]` dtype.
    pub q: Tensor,
    /// `[S, D]` f32 and `[S, 1]` f32.
    pub lm: Tensor,
    pub outlier: Tensor,
    /// `[B, Hkv, N]` u32, `[B, 4]` u32, `[M]` u32, `[M, Hkv, n_out]` u32.
    pub candidates: Tensor,
    pub rows: Tensor,
    pub chunks: Tensor,
    pub outlier_ids: Tensor,
    /// `[B, Hkv, K]` u32 chunks chosen among each row's `0..ef` (independent of scores).
    pub top: Tensor,
    /// `[LP, P, r]`, `[M, r, Hkv·D]`, `[S, 1]` f32, `[T, D/2]` ×2, `[S, 2, P, D]`.
    pub left: Tensor,
    pub right: Tensor,
    pub left_map: Tensor,
    pub cos: Tensor,
    pub sin: Tensor,
    pub values: Tensor,
}

/// Pages of the candidates' width.
pub const SKV_N: usize = 24;
/// Outlier ids per (owner, KV head).
pub const SKV_OUT: usize = 3;

pub fn skv_case(seed: u64, sz: SkvSizes) -> SkvCase {
    let mut r = rng(seed);
    let cpu = Device::Cpu;
    let (b, hkv, d, p, n) = (sz.b, sz.hkv, sz.d, sz.p, SKV_N);
    let geo = ShadowKvGeometry {
        page_size: p,
        window: 2 * p + 3,
    };
    let owners = b + 1;
    // Row 1 is padding; the last row's owner has no compressed chunk.
    let mut rows = Vec::new();
    let mut chunks = vec![0u32; owners];
    let mut pages = vec![0usize; b];
    for bi in 0..b {
        let owner = (bi + 1) % owners;
        let nt = r.random_range(4 * p..=n * p);
        pages[bi] = nt.div_ceil(p);
        let live = u32::from(bi != 1);
        if bi + 1 != b {
            let full = (nt / p).max(1);
            chunks[owner] = r.random_range(full.div_ceil(2)..=full) as u32;
        }
        rows.extend([owner as u32, (nt - 1) as u32, live, bi as u32]);
    }
    let s = b * hkv * n + 7;
    let mut perm: Vec<u32> = (0..s as u32).collect();
    perm.shuffle(&mut r);
    let mut cand = vec![NONE; b * hkv * n];
    for bi in 0..b {
        for h in 0..hkv {
            for j in 0..pages[bi] {
                cand[(bi * hkv + h) * n + j] = perm[(bi * hkv + h) * n + j];
            }
        }
    }
    let flags: Vec<f32> = (0..s)
        .map(|_| {
            if r.random::<f32>() < 0.2 {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mut oids = vec![NONE; owners * hkv * SKV_OUT];
    for o in 0..owners {
        for h in 0..hkv {
            let c = chunks[o] as usize;
            let mut ids: Vec<u32> = (0..c as u32).collect();
            ids.shuffle(&mut r);
            let mut ids: Vec<u32> = ids.into_iter().take(r.random_range(0..=SKV_OUT)).collect();
            ids.sort_unstable();
            oids[(o * hkv + h) * SKV_OUT..][..ids.len()].copy_from_slice(&ids);
        }
    }
    let mut top = vec![NONE; b * hkv * sz.k];
    for bi in 0..b {
        let [owner, pos, live] = [
            rows[4 * bi] as usize,
            rows[4 * bi + 1] as usize,
            rows[4 * bi + 2] as usize,
        ];
        let (ef, _) = geo.exact_region(pos, live, chunks[owner] as usize);
        for h in 0..hkv {
            let mut ids: Vec<u32> = (0..ef as u32).collect();
            ids.shuffle(&mut r);
            for (j, id) in ids.into_iter().take(sz.k).enumerate() {
                top[(bi * hkv + h) * sz.k + j] = id;
            }
        }
    }
    let lps = s.div_ceil(hkv) + 1;
    let lmap: Vec<f32> = (0..s).map(|_| r.random_range(0..lps) as f32).collect();
    let positions: Vec<u32> = (0..(n * p) as u32).collect();
    let (cos, sin) = spinkv::rope::rope_tables(&positions, d, 10_000.0, sz.dtype, &cpu).unwrap();
    let dt = |t: Tensor| t.to_dtype(sz.dtype).unwrap();
    SkvCase {
        sizes: sz,
        geo,
        q: dt(randn(&mut r, &[b, hkv * sz.g, d], 1.0)),
        lm: randn(&mut r, &[s, d], 0.5),
        outlier: Tensor::from_vec(flags, (s, 1), &cpu).unwrap(),
        candidates: Tensor::from_vec(cand, (b, hkv, n), &cpu).unwrap(),
        rows: Tensor::from_vec(rows, (b, 4), &cpu).unwrap(),
        chunks: Tensor::from_vec(chunks, owners, &cpu).unwrap(),
        outlier_ids: Tensor::from_vec(oids, (owners, hkv, SKV_OUT), &cpu).unwrap(),
        top: Tensor::from_vec(top, (b, hkv, sz.k), &cpu).unwrap(),
        left: dt(randn(&mut r, &[lps, p, sz.r], 1.0)),
        right: dt(randn(&mut r, &[owners, sz.r, hkv * d], 1.0 / (sz.r as f32).sqrt())),
        left_map: Tensor::from_vec(lmap, (s, 1), &cpu).unwrap(),
        cos,
        sin,
        values: dt(randn(&mut r, &[s, 2, p, d], 1.0)),
    }
}

impl SkvCase {
    /// Every tensor moved to `dev` (same field order).
    pub fn to(&self, dev: &Device) -> SkvCase {
        let m = |t: &Tensor| t.to_device(dev).unwrap();
        SkvCase {
            sizes: self.sizes,
            geo: self.geo,
            q: m(&self.q),
            lm: m(&self.lm),
            outlier: m(&self.outlier),
            candidates: m(&self.candidates),
            rows: m(&self.rows),
            chunks: m(&self.chunks),
            outlier_ids: m(&self.outlier_ids),
            top: m(&self.top),
            left: m(&self.left),
            right: m(&self.right),
            left_map: m(&self.left_map),
            cos: m(&self.cos),
            sin: m(&self.sin),
            values: m(&self.values),
        }
    }

    pub fn scores(&self, scale: f32) -> spinkv::Result<Tensor> {
        spinkv::ops::shadowkv_scores(
            &self.q,
            &self.lm,
            &self.outlier,
            &self.candidates,
            &self.rows,
            &self.chunks,
            &self.geo,
            scale,
        )
    }

    pub fn lists(&self, with_top: bool) -> spinkv::Result<(Tensor, Tensor)> {
        spinkv::ops::shadowkv_lists(
            &self.top,
            &self.rows,
            &self.chunks,
            &self.outlier_ids,
            SKV_N,
            &self.geo,
            with_top,
        )
    }

    pub fn rebuild(&self, with_values: bool) -> spinkv::Result<Tensor> {
        spinkv::ops::shadowkv_rebuild(
            &self.left,
            &self.right,
            &self.top,
            &self.candidates,
            &self.rows,
            &self.left_map,
            &self.cos,
            &self.sin,
            with_values.then_some(&self.values),
        )
    }
}
