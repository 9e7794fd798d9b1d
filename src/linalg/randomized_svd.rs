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
    const OP: &str = "randomized_low_rank";
    let (m, n) = match x.dims() {
        [m, n] => (*m, *n),
        d => crate::invalid!(OP, "x must be a matrix [m, n], got {d:?}"),
    };
    if rank == 0 || m == 0 || n == 0 {
        crate::invalid!(OP, "rank ({rank}) and x {:?} must be non-empty", x.dims());
    }
    let r = rank.min(m).min(n);
    let k = (r + opts.oversample).min(m).min(n);
    let dev = x.device();
    let x = x.to_dtype(DType::F64)?;
    let xt = x.t()?.contiguous()?;
    let omega = gaussian(n, k, opts.seed, dev)?;
    // The power iterations only need well-conditioned bases (one CholQR pass each); the
    // final basis must be orthonormal to rounding (two).
    let mut q = orthonormalize(&x.matmul(&omega)?, if opts.power_iters == 0 { 2 } else { 1 })?;
    for it in 0..opts.power_iters {
        let z = orthonormalize(&xt.matmul(&q)?, 1)?;
        q = orthonormalize(&x.matmul(&z)?, if it + 1 == opts.power_iters { 2 } else { 1 })?;
    }
    let k = q.dim(1)?; // may have shrunk: rank-deficient input
    let r = r.min(k);
    let b = q.t()?.contiguous()?.matmul(&x)?; // [k, n]
    let g = host_square(&b.matmul(&b.t()?)?, k)?;
    let (values, vectors) = symmetric_eigen(&g, k);
    let w: Vec<f64> = (0..k).flat_map(|row| vectors[row * k..][..r].to_vec()).collect();
    let w = Tensor::from_vec(w, (k, r), dev)?;
    let left = q.matmul(&w)?.to_dtype(DType::F32)?;
    let right = w.t()?.contiguous()?.matmul(&b)?.to_dtype(DType::F32)?;
    let singular_values = values[..r].iter().map(|&l| l.max(0.0).sqrt()).collect();
    Ok(LowRank {
        left,
        right,
        singular_values,
    })
}

/// The largest `max rᵢᵢ / min rᵢᵢ` of the first Cholesky factor for which CholQR2 is
/// used: CholQR's loss of orthogonality grows as `cond(Y)² · ε` (1e-6 at 1e5 in f64), and
/// the second pass removes it.
const CHOLQR_MAX_COND: f64 = 1e5;

/// Columns spanning the range of `y` `[m, k]` (f64): `passes` rounds of Cholesky QR when
/// `y` is well conditioned (checked on the factors: the first one's diagonal ratio, a
/// later one's diagonal within 10% of 1), else [`svqb`]. One pass leaves an orthogonality
/// error of about `cond(y)² · ε`; two are orthonormal to rounding (CholQR2).
fn orthonormalize(y: &Tensor, passes: usize) -> Result<Tensor> {
    let k = y.dim(1)?;
    let mut q = y.clone();
    for pass in 0..passes {
        let g = host_square(&q.t()?.contiguous()?.matmul(&q)?, k)?;
        let r = match cholesky_upper(&g, k, CHOLQR_MAX_COND) {
            Some(r) if pass == 0 || (0..k).all(|i| (r[i * k + i] - 1.0).abs() < 0.1) => r,
            _ => return svqb(y),
        };
        q = q.matmul(&Tensor::from_vec(upper_inverse(&r, k), (k, k), y.device())?)?;
    }
    Ok(q)
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
