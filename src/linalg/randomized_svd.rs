//! Randomized truncated SVD (Halko, Martinsson & Tropp, 2011): a Gaussian range finder
//! with power iterations, each block orthonormalized by Cholesky QR twice (CholQR2: the
//! small Gram matrix's Cholesky factor on the host, `Y R⁻¹` on the device) while the block
//! is well conditioned, else by SVQB (eigen-decomposition of the Gram matrix, directions
//! below rounding dropped — robust to rank deficiency and to the wide dynamic range of
//! some inputs); then the small `k × k` eigen problem of `B Bᵀ` solved on the host. The
//! products with the input matrix run as candle f64 matmuls on its device, batched over
//! the same-shape matrices of a batch.
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
/// equal to calling it on each (to rounding). Matrices of one shape are stacked and go
/// through [`randomized_low_rank_stacked`] together. ShadowKV factorizes every sequence of
/// a step that needs it in one batch.
pub fn randomized_low_rank_batch(xs: &[&Tensor], rank: usize, opts: LowRankOptions) -> Result<Vec<LowRank>> {
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
    // Stacks of same-shape matrices, in order of first appearance.
    let mut groups: Vec<((usize, usize), Vec<usize>)> = Vec::new();
    for (i, &shape) in shapes.iter().enumerate() {
        match groups.iter_mut().find(|(s, _)| *s == shape) {
            Some((_, items)) => items.push(i),
            None => groups.push((shape, vec![i])),
        }
    }
    let mut stacks = Vec::with_capacity(groups.len());
    for (_, items) in &groups {
        let dtype = xs[items[0]].dtype();
        stacks.push(if items.iter().all(|&i| xs[i].dtype() == dtype) {
            Tensor::stack(&items.iter().map(|&i| xs[i]).collect::<Vec<_>>(), 0)?
        } else {
            let x64 = items
                .iter()
                .map(|&i| xs[i].to_dtype(DType::F64))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::stack(&x64, 0)?
        });
    }
    let factors = randomized_low_rank_stacked(&stacks.iter().collect::<Vec<_>>(), rank, opts)?;
    let mut out: Vec<Option<LowRank>> = vec![None; xs.len()];
    for (&i, lr) in groups.iter().flat_map(|(_, items)| items).zip(factors) {
        out[i] = Some(lr);
    }
    out.into_iter()
        .map(|lr| lr.ok_or_else(|| Error::Config(format!("{OP}: a factor is missing"))))
        .collect()
}

/// [`randomized_low_rank`] of every matrix of each stack `xs[s]` `[bₛ, mₛ, nₛ]` (any
/// float dtype, on one device): the factors of `xs[0]`'s matrices in order, then
/// `xs[1]`'s, and so on. A stack goes through every phase together: one batched matmul per
/// product, one host read of all its small Gram matrices, whose factorizations (Cholesky,
/// eigen) run in parallel (rayon), and one upload of the results; so a stack costs about
/// one matrix's kernel launches and host round trips. A matrix whose basis needs SVQB
/// (ill-conditioned) leaves its stack and continues alone.
pub fn randomized_low_rank_stacked(xs: &[&Tensor], rank: usize, opts: LowRankOptions) -> Result<Vec<LowRank>> {
    let mut parts = Vec::with_capacity(xs.len());
    let mut total = 0;
    for x in xs {
        let (b, m, n) = match x.dims() {
            [b, m, n] => (*b, *m, *n),
            d => crate::invalid!(OP, "a stack must be [b, m, n], got {d:?}"),
        };
        if rank == 0 || m == 0 || n == 0 {
            crate::invalid!(
                OP,
                "rank ({rank}) and the stack's matrices {:?} must be non-empty",
                x.dims()
            );
        }
        let items: Vec<usize> = (total..total + b).collect();
        total += b;
        if b == 0 {
            continue;
        }
        let x = x.to_dtype(DType::F64)?;
        let xt = x.transpose(1, 2)?.contiguous()?;
        let k = (rank.min(m).min(n) + opts.oversample).min(m).min(n);
        let y = x.broadcast_matmul(&gaussian(n, k, opts.seed, x.device())?)?; // [b, m, k]
        parts.push((Stack { items, x, xt }, y));
    }
    // The power iterations only need well-conditioned bases (one CholQR pass each); the
    // final basis must be orthonormal to rounding (two).
    let mut q = orthonormalize(parts, if opts.power_iters == 0 { 2 } else { 1 })?;
    for it in 0..opts.power_iters {
        let xtq = q
            .into_iter()
            .map(|(st, q)| Ok((st.xt.matmul(&q)?, st)))
            .collect::<Result<Vec<_>>>()?;
        let z = orthonormalize(xtq.into_iter().map(|(y, st)| (st, y)).collect(), 1)?;
        let xz = z
            .into_iter()
            .map(|(st, z)| Ok((st.x.matmul(&z)?, st)))
            .collect::<Result<Vec<_>>>()?;
        let passes = if it + 1 == opts.power_iters { 2 } else { 1 };
        q = orthonormalize(xz.into_iter().map(|(y, st)| (st, y)).collect(), passes)?;
    }
    let mut out: Vec<Option<LowRank>> = vec![None; total];
    for (st, q) in q {
        let (_, m, n) = st.x.dims3()?;
        let k = q.dim(2)?; // may have shrunk: rank-deficient input
        let r = rank.min(m).min(n).min(k);
        let b = q.transpose(1, 2)?.contiguous()?.matmul(&st.x)?; // [b, k, n]
        let grams = host_squares(&b.matmul(&b.transpose(1, 2)?)?, k)?;
        let span = crate::host_timing::span("low_rank.eigen");
        let eigens: Vec<(Vec<f64>, Vec<f64>)> = grams.par_iter().map(|g| symmetric_eigen(g, k)).collect();
        drop(span);
        let w: Vec<f64> = eigens
            .iter()
            .flat_map(|(_, vectors)| vectors.chunks_exact(k).flat_map(|row| row[..r].to_vec()))
            .collect();
        let w = Tensor::from_vec(w, (st.items.len(), k, r), q.device())?;
        let left = q.matmul(&w)?.to_dtype(DType::F32)?; // [b, m, r]
        let right = w.transpose(1, 2)?.contiguous()?.matmul(&b)?.to_dtype(DType::F32)?; // [b, r, n]
        for (j, (&item, (values, _))) in st.items.iter().zip(&eigens).enumerate() {
            // Copies of the item's rows only (`force_contiguous`), so that each factor owns
            // just its memory: a view would hold the whole stack, and so would
            // `Tensor::copy`, which clones the whole storage under the view.
            out[item] = Some(LowRank {
                left: left.get(j)?.force_contiguous()?,
                right: right.get(j)?.force_contiguous()?,
                singular_values: values[..r].iter().map(|&l| l.max(0.0).sqrt()).collect(),
            });
        }
    }
    out.into_iter()
        .map(|lr| lr.ok_or_else(|| Error::Config(format!("{OP}: a factor is missing"))))
        .collect()
}

const OP: &str = "randomized_low_rank";

/// Same-shape input matrices factorized together: `x` `[b, m, n]` f64 and its transpose
/// `xt` `[b, n, m]` (contiguous), stacked in the order of `items` (indices into the
/// output).
struct Stack {
    items: Vec<usize>,
    x: Tensor,
    xt: Tensor,
}

impl Stack {
    /// The stack of the items at positions `keep` (in order), with `ids` the same
    /// positions as a u32 tensor on the stack's device.
    fn select(&self, keep: &[usize], ids: &Tensor) -> Result<Stack> {
        Ok(Stack {
            items: keep.iter().map(|&j| self.items[j]).collect(),
            x: self.x.index_select(ids, 0)?,
            xt: self.xt.index_select(ids, 0)?,
        })
    }
}

/// `positions` as a u32 index tensor on `dev`.
fn index_tensor(positions: &[usize], dev: &Device) -> Result<Tensor> {
    let v: Vec<u32> = positions.iter().map(|&j| j as u32).collect();
    Ok(Tensor::from_vec(v, positions.len(), dev)?)
}

/// The largest `max rᵢᵢ / min rᵢᵢ` of the first Cholesky factor for which CholQR2 is
/// used: CholQR's loss of orthogonality grows as `cond(Y)² · ε` (1e-6 at 1e5 in f64), and
/// the second pass removes it.
const CHOLQR_MAX_COND: f64 = 1e5;

/// Columns spanning the range of each stacked `y` `[b, m, k]` (f64): `passes` rounds of
/// Cholesky QR while a matrix is well conditioned (checked on the factors: the first
/// one's diagonal ratio, a later one's diagonal within 10% of 1), else [`svqb`] of its
/// `y`, alone. One pass leaves an orthogonality error of about `cond(y)² · ε`; two are
/// orthonormal to rounding (CholQR2). A stack's Gram matrices are read back together;
/// all of them are factorized in parallel.
fn orthonormalize(parts: Vec<(Stack, Tensor)>, passes: usize) -> Result<Vec<(Stack, Tensor)>> {
    // (stack, its y, its basis so far)
    let mut live: Vec<(Stack, Tensor, Tensor)> = parts.into_iter().map(|(s, y)| (s, y.clone(), y)).collect();
    let mut alone = Vec::new();
    for pass in 0..passes {
        let mut next = Vec::with_capacity(live.len());
        for (st, y, q) in live {
            let k = q.dim(2)?;
            let grams = host_squares(&q.transpose(1, 2)?.contiguous()?.matmul(&q)?, k)?;
            let span = crate::host_timing::span("low_rank.cholesky");
            let inverses: Vec<Option<Vec<f64>>> = grams
                .par_iter()
                .map(|g| {
                    let r = cholesky_upper(g, k, CHOLQR_MAX_COND)?;
                    let close = pass == 0 || (0..k).all(|i| (r[i * k + i] - 1.0).abs() < 0.1);
                    close.then(|| upper_inverse(&r, k))
                })
                .collect();
            drop(span);
            let (mut keep, mut inv) = (Vec::new(), Vec::new());
            for (j, r_inv) in inverses.into_iter().enumerate() {
                match r_inv {
                    Some(r_inv) => {
                        keep.push(j);
                        inv.extend(r_inv);
                    }
                    // Ill-conditioned: SVQB of its y, on its own from here on.
                    None => {
                        let ids = index_tensor(&[j], y.device())?;
                        alone.push((st.select(&[j], &ids)?, svqb(&y.get(j)?)?.unsqueeze(0)?));
                    }
                }
            }
            if keep.is_empty() {
                continue;
            }
            let inv = Tensor::from_vec(inv, (keep.len(), k, k), q.device())?;
            if keep.len() == st.items.len() {
                next.push((st, y, q.matmul(&inv)?));
            } else {
                let ids = index_tensor(&keep, q.device())?;
                let q = q.index_select(&ids, 0)?.matmul(&inv)?;
                next.push((st.select(&keep, &ids)?, y.index_select(&ids, 0)?, q));
            }
        }
        live = next;
    }
    Ok(live.into_iter().map(|(st, _, q)| (st, q)).chain(alone).collect())
}

/// Orthonormal columns spanning the numerically significant range of `y` `[m, k]` (f64):
/// two SVQB passes (`Y W Λ^{-1/2}` from the eigen pairs of `YᵀY`), dropping directions
/// whose eigenvalue is below `1e-13 · λ_max`; the result may have fewer than `k` columns.
fn svqb(y: &Tensor) -> Result<Tensor> {
    let mut y = y.clone();
    for _pass in 0..2 {
        let k = y.dim(1)?;
        let g = host_squares(&y.t()?.contiguous()?.matmul(&y)?, k)?.swap_remove(0);
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

/// The `[b, k, k]` f64 matrices of `t` on the host, each as a row-major `Vec` (one read).
fn host_squares(t: &Tensor, k: usize) -> Result<Vec<Vec<f64>>> {
    // On a GPU this read waits for the device work queued before it.
    let span = crate::host_timing::span("low_rank.read");
    let v = t.flatten_all()?.to_vec1::<f64>()?;
    drop(span);
    if k == 0 || v.len() % (k * k) != 0 || v.iter().any(|x| !x.is_finite()) {
        return Err(Error::Invalid {
            op: "randomized_low_rank",
            msg: "non-finite values in the input matrix".into(),
        });
    }
    Ok(v.chunks_exact(k * k).map(<[f64]>::to_vec).collect())
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
