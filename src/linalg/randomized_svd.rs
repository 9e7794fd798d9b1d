//! Randomized truncated SVD (Halko, Martinsson & Tropp, 2011): a Gaussian range finder
//! with power iterations, each block orthonormalized by Cholesky QR twice (CholQR2: the
//! small Gram matrix's Cholesky factor on the host, `Y R⁻¹` on the device) while the block
//! is well conditioned, else by SVQB (eigen-decomposition of the Gram matrix, directions
//! below rounding dropped — robust to rank deficiency and to the wide dynamic range of
//! some inputs); then the small `k × k` eigen problem of `B Bᵀ` solved on the host. The
//! products with the input matrix run as candle f64 matmuls on its device.
//!
//! Cost of the host part at the default two power iterations: one eigen solve and six
//! Cholesky factors with their inverses (one pass for each intermediate basis, two for the
//! final one) when every block is well conditioned, against eleven eigen solves with
//! SVQB everywhere.

use super::small::{cholesky_upper, symmetric_eigen, upper_inverse};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

/// Options of [`randomized_low_rank`].
#[derive(Debug, Clone, Copy)]
pub struct LowRankOptions {
    /// Extra random directions beyond the rank (default 10).
    pub oversample: usize,
    /// Power iterations, each sharpening the spectrum's decay (default 2).
    pub power_iters: usize,
    /// Seed of the Gaussian test matrix.
    pub seed: u64,
}

impl Default for LowRankOptions {
    fn default() -> Self {
        Self {
            oversample: 10,
            power_iters: 2,
            seed: 0x5EED_5B1D,
        }
    }
}

/// A rank-`r` factorization `x ≈ left · right`.
#[derive(Debug, Clone)]
pub struct LowRank {
    /// `[m, r]` f32, orthonormal columns.
    pub left: Tensor,
    /// `[r, n]` f32 (= `Σ Vᵀ`).
    pub right: Tensor,
    /// The `r` estimated singular values, descending.
    pub singular_values: Vec<f64>,
}

impl LowRank {
    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.singular_values.len()
    }
}

/// Rank-`rank` approximation of `x` `[m, n]` (any float dtype; `rank` is capped by
/// `min(m, n)` and by the numerical rank of `x`). At `rank = min(m, n)` the factorization reproduces `x` to float
/// rounding; below it the error is close to the SVD's tail `sqrt(Σ_{i>r} σᵢ²)`.
pub fn randomized_low_rank(x: &Tensor, rank: usize, opts: LowRankOptions) -> Result<LowRank> {
    let mut out = randomized_low_rank_batch(&[x], rank, opts)?;
    Ok(out.remove(0))
}

/// [`randomized_low_rank`] of several matrices at once (each `[mᵢ, nᵢ]`, on one device),
/// equal to calling it on each: the device work of all matrices is issued phase by phase,
/// and the small host factorizations of a phase (Cholesky, eigen) run in parallel
/// (rayon), so a batch costs about one matrix's host round trips instead of one per
/// matrix. ShadowKV factorizes every sequence of a step that needs it in one batch.
pub fn randomized_low_rank_batch(xs: &[&Tensor], rank: usize, opts: LowRankOptions) -> Result<Vec<LowRank>> {
    const OP: &str = "randomized_low_rank";
    let mut shapes = Vec::with_capacity(xs.len());
    for x in xs {
        let (m, n) = match x.dims() {
            [m, n] => (*m, *n),
            d => crate::invalid!(OP, "x must be a matrix [m, n], got {d:?}"),
        };
        if rank == 0 || m == 0 || n == 0 {
            crate::invalid!(OP, "rank ({rank}) and x {:?} must be non-empty", x.dims());
        }
        shapes.push((m, n));
    }
    let x: Vec<Tensor> = xs
        .iter()
        .map(|x| x.to_dtype(DType::F64))
        .collect::<candle_core::Result<_>>()?;
    let xt: Vec<Tensor> = x
        .iter()
        .map(|x| x.t()?.contiguous())
        .collect::<candle_core::Result<_>>()?;
    let mut y = Vec::with_capacity(x.len());
    for (x, &(m, n)) in x.iter().zip(&shapes) {
        let k = (rank.min(m).min(n) + opts.oversample).min(m).min(n);
        y.push(x.matmul(&gaussian(n, k, opts.seed, x.device())?)?);
    }
    // The power iterations only need well-conditioned bases (one CholQR pass each); the
    // final basis must be orthonormal to rounding (two).
    let mut q = orthonormalize(&y, if opts.power_iters == 0 { 2 } else { 1 })?;
    for it in 0..opts.power_iters {
        let z = orthonormalize(&products(&xt, &q)?, 1)?;
        q = orthonormalize(&products(&x, &z)?, if it + 1 == opts.power_iters { 2 } else { 1 })?;
    }
    let mut b = Vec::with_capacity(x.len());
    let mut grams = Vec::with_capacity(x.len());
    for (q, x) in q.iter().zip(&x) {
        let bi = q.t()?.contiguous()?.matmul(x)?; // [k, n]
        let k = q.dim(1)?;
        grams.push((host_square(&bi.matmul(&bi.t()?)?, k)?, k));
        b.push(bi);
    }
    let eigens: Vec<(Vec<f64>, Vec<f64>)> = grams.par_iter().map(|(g, k)| symmetric_eigen(g, *k)).collect();
    let mut out = Vec::with_capacity(x.len());
    for (((q, b), (values, vectors)), &(m, n)) in q.iter().zip(&b).zip(eigens).zip(&shapes) {
        let k = q.dim(1)?; // may have shrunk: rank-deficient input
        let r = rank.min(m).min(n).min(k);
        let w: Vec<f64> = (0..k).flat_map(|row| vectors[row * k..][..r].to_vec()).collect();
        let w = Tensor::from_vec(w, (k, r), q.device())?;
        out.push(LowRank {
            left: q.matmul(&w)?.to_dtype(DType::F32)?,
            right: w.t()?.contiguous()?.matmul(b)?.to_dtype(DType::F32)?,
            singular_values: values[..r].iter().map(|&l| l.max(0.0).sqrt()).collect(),
        });
    }
    Ok(out)
}

/// `a[i] · b[i]` for every i.
fn products(a: &[Tensor], b: &[Tensor]) -> Result<Vec<Tensor>> {
    Ok(a.iter()
        .zip(b)
        .map(|(a, b)| a.matmul(b))
        .collect::<candle_core::Result<_>>()?)
}

/// The largest `max rᵢᵢ / min rᵢᵢ` of the first Cholesky factor for which CholQR2 is
/// used: CholQR's loss of orthogonality grows as `cond(Y)² · ε` (1e-6 at 1e5 in f64), and
/// the second pass removes it.
const CHOLQR_MAX_COND: f64 = 1e5;

/// Columns spanning the range of each `y[i]` `[m, k]` (f64): `passes` rounds of Cholesky
/// QR while `y[i]` is well conditioned (checked on the factors: the first one's diagonal
/// ratio, a later one's diagonal within 10% of 1), else [`svqb`]. One pass leaves an
/// orthogonality error of about `cond(y)² · ε`; two are orthonormal to rounding (CholQR2).
/// The Gram matrices of a pass are read back together and factorized in parallel.
fn orthonormalize(y: &[Tensor], passes: usize) -> Result<Vec<Tensor>> {
    let mut q: Vec<Option<Tensor>> = y.iter().cloned().map(Some).collect();
    for pass in 0..passes {
        let mut grams = Vec::with_capacity(q.len());
        for qi in &q {
            grams.push(match qi {
                Some(qi) => {
                    let k = qi.dim(1)?;
                    Some((host_square(&qi.t()?.contiguous()?.matmul(qi)?, k)?, k))
                }
                None => None,
            });
        }
        let inverses: Vec<Option<Vec<f64>>> = grams
            .par_iter()
            .map(|g| {
                let (g, k) = g.as_ref()?;
                let k = *k;
                let r = cholesky_upper(g, k, CHOLQR_MAX_COND)?;
                let close = pass == 0 || (0..k).all(|i| (r[i * k + i] - 1.0).abs() < 0.1);
                close.then(|| upper_inverse(&r, k))
            })
            .collect();
        for (qi, inv) in q.iter_mut().zip(inverses) {
            *qi = match (qi.take(), inv) {
                (Some(t), Some(inv)) => {
                    let k = t.dim(1)?;
                    Some(t.matmul(&Tensor::from_vec(inv, (k, k), t.device())?)?)
                }
                _ => None, // ill-conditioned: SVQB below
            };
        }
    }
    q.into_iter()
        .zip(y)
        .map(|(q, y)| match q {
            Some(q) => Ok(q),
            None => svqb(y),
        })
        .collect()
}

/// Orthonormal columns spanning the numerically significant range of `y` `[m, k]` (f64):
/// two SVQB passes (`Y W Λ^{-1/2}` from the eigen pairs of `YᵀY`), dropping directions
/// whose eigenvalue is below `1e-13 · λ_max`; the result may have fewer than `k` columns.
fn svqb(y: &Tensor) -> Result<Tensor> {
    let mut y = y.clone();
    for _pass in 0..2 {
        let k = y.dim(1)?;
        let g = host_square(&y.t()?.contiguous()?.matmul(&y)?, k)?;
        let (values, vectors) = symmetric_eigen(&g, k);
        let cut = values.first().copied().unwrap_or(0.0).max(0.0) * 1e-13;
        let keep = values.iter().take_while(|&&l| l > cut && l > 0.0).count().max(1);
        let mut w = vec![0.0; k * keep];
        for row in 0..k {
            for col in 0..keep {
                w[row * keep + col] = vectors[row * k + col] / values[col].max(f64::MIN_POSITIVE).sqrt();
            }
        }
        y = y.matmul(&Tensor::from_vec(w, (k, keep), y.device())?)?;
    }
    Ok(y)
}

fn host_square(t: &Tensor, k: usize) -> Result<Vec<f64>> {
    let v = t.flatten_all()?.to_vec1::<f64>()?;
    if v.len() != k * k || v.iter().any(|x| !x.is_finite()) {
        return Err(Error::Invalid {
            op: "randomized_low_rank",
            msg: "non-finite values in the input matrix".into(),
        });
    }
    Ok(v)
}

/// `[rows, cols]` standard normal f64 entries from a seeded xorshift + Box–Muller.
fn gaussian(rows: usize, cols: usize, seed: u64, dev: &Device) -> Result<Tensor> {
    let mut s = seed | 1;
    let mut uniform = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let data: Vec<f64> = (0..rows * cols)
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        })
        .collect();
    Ok(Tensor::from_vec(data, (rows, cols), dev)?)
}
