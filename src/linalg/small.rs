//! Small dense f64 factorization in plain Rust (row-major `k × k` matrices): the
//! symmetric eigen solver (Householder tridiagonalization + implicit QL, `≈ 9k³` flops),
//! and the Cholesky factor with its triangular inverse (`≈ k³/3` flops each, ~25× cheaper
//! than an eigen solve). Used on `k ≈ rank` matrices only.

/// Upper-triangular Cholesky factor `R` (row-major, `A = RᵀR`) of a symmetric positive
/// definite `k × k` matrix, or `None` when a pivot is not positive or the factor's
/// diagonal spans more than `max_ratio` (`max rᵢᵢ / min rᵢᵢ`, a lower bound on the
/// condition number of any `Y` with `A = YᵀY`).
pub fn cholesky_upper(a: &[f64], k: usize, max_ratio: f64) -> Option<Vec<f64>> {
    // Right-looking, row by row: row j of R is the trailing matrix's row j over its pivot,
    // then the trailing matrix loses r_jᵀ r_j (contiguous rows; the upper triangle only).
    let mut r = a.to_vec();
    for j in 0..k {
        let pivot = r[j * k + j];
        if pivot.is_nan() || pivot <= 0.0 {
            return None;
        }
        let rjj = pivot.sqrt();
        r[j * k..j * k + j].fill(0.0);
        r[j * k + j] = rjj;
        for x in &mut r[j * k + j + 1..(j + 1) * k] {
            *x /= rjj;
        }
        let (done, rest) = r.split_at_mut((j + 1) * k);
        let rj = &done[j * k..];
        for i in j + 1..k {
            let f = rj[i];
            for (x, &y) in rest[(i - j - 1) * k + i..(i - j) * k].iter_mut().zip(&rj[i..]) {
                *x -= f * y;
            }
        }
    }
    let diag = (0..k).map(|i| r[i * k + i]);
    let (lo, hi) = diag.fold((f64::INFINITY, 0.0f64), |(lo, hi), d| (lo.min(d), hi.max(d)));
    (k == 0 || hi <= max_ratio * lo).then_some(r)
}

/// Inverse of a non-singular upper-triangular `k × k` matrix (row-major), row by row from
/// the bottom: `inv[i, :] = (e_i − Σ_{p>i} r[i, p] · inv[p, :]) / r[i, i]` (contiguous rows).
pub fn upper_inverse(r: &[f64], k: usize) -> Vec<f64> {
    let mut inv = vec![0.0; k * k];
    for i in (0..k).rev() {
        let (head, below) = inv.split_at_mut((i + 1) * k);
        let row = &mut head[i * k..];
        row[i] = 1.0;
        for p in i + 1..k {
            let f = r[i * k + p];
            for (x, &y) in row[p..].iter_mut().zip(&below[(p - i - 1) * k + p..(p - i) * k]) {
                *x -= f * y;
            }
        }
        let d = r[i * k + i];
        for x in &mut row[i..] {
            *x /= d;
        }
    }
    inv
}

/// Eigen-decomposition of a symmetric `k × k` matrix: Householder reduction to
/// tridiagonal form, then the implicit QL algorithm (the classic `tred2` / `tql2` pair,
/// about `9k³` flops). Returns `(values, vectors)` sorted by value, descending; `vectors`
/// is row-major with eigenvector `i` in column `i`. Only the lower triangle of `a` is
/// read.
///
/// The working matrix is held transposed (`w = vᵀ`, row-major), so that every inner loop
/// of both phases — above all the QL rotations, which combine two eigenvector columns of
/// `v` — runs over contiguous memory, and its dot products keep four partial sums.
pub fn symmetric_eigen(a: &[f64], k: usize) -> (Vec<f64>, Vec<f64>) {
    let n = k;
    if n == 0 {
        return (Vec::new(), Vec::new());
    }
    // w = aᵀ: w's upper triangle holds a's lower triangle.
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            v[j * n + i] = a[i * n + j];
        }
    }
    let mut d = vec![0.0; n];
    let mut e = vec![0.0; n];
    tridiagonalize(&mut v, &mut d, &mut e, n);
    tridiagonal_ql(&mut v, &mut d, &mut e, n);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| d[y].total_cmp(&d[x]));
    let values = order.iter().map(|&i| d[i]).collect();
    let mut vectors = vec![0.0; n * n];
    for (col, &i) in order.iter().enumerate() {
        for (row, &x) in v[i * n..(i + 1) * n].iter().enumerate() {
            vectors[row * n + col] = x;
        }
    }
    (values, vectors)
}

/// Householder reduction of the symmetric matrix in `v` (held transposed) to tridiagonal
/// form: on return `d` is the diagonal, `e[1..]` the subdiagonal, `v` the orthogonal
/// transformation (transposed).
fn tridiagonalize(v: &mut [f64], d: &mut [f64], e: &mut [f64], n: usize) {
    // Element (i, j) of the textbook's `v` lives at w[j][i].
    let at = |i: usize, j: usize| j * n + i;
    for j in 0..n {
        d[j] = v[at(n - 1, j)];
    }
    for i in (1..n).rev() {
        let scale: f64 = d[..i].iter().map(|x| x.abs()).sum();
        let mut h = 0.0;
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v[at(i - 1, j)];
                v[at(i, j)] = 0.0;
                v[at(j, i)] = 0.0;
            }
        } else {
            for x in d[..i].iter_mut() {
                *x /= scale;
                h += *x * *x;
            }
            let mut f = d[i - 1];
            let mut g = h.sqrt();
            if f > 0.0 {
                g = -g;
            }
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            for x in e[..i].iter_mut() {
                *x = 0.0;
            }
            for j in 0..i {
                f = d[j];
                v[at(j, i)] = f;
                let row = &v[j * n + j + 1..j * n + i]; // at(j + 1..i, j)
                for (ek, &x) in e[j + 1..i].iter_mut().zip(row) {
                    *ek += x * f;
                }
                e[j] += v[at(j, j)] * f + dot(row, &d[j + 1..i]);
            }
            f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                f = d[j];
                g = e[j];
                let row = &mut v[j * n + j..j * n + i]; // at(j..i, j)
                for ((x, &ek), &dk) in row.iter_mut().zip(&e[j..i]).zip(&d[j..i]) {
                    *x -= f * ek + g * dk;
                }
                d[j] = v[at(i - 1, j)];
                v[at(i, j)] = 0.0;
            }
        }
        d[i] = h;
    }
    for i in 0..n - 1 {
        v[at(n - 1, i)] = v[at(i, i)];
        v[at(i, i)] = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for kk in 0..=i {
                d[kk] = v[at(kk, i + 1)] / h;
            }
            // Rows j ≤ i of w lose g·d, g their dot product with row i + 1 (at(.., i + 1)).
            let (head, tail) = v.split_at_mut((i + 1) * n);
            let pivot = &tail[..=i];
            for row in head.chunks_exact_mut(n) {
                let row = &mut row[..=i];
                let g = dot(pivot, row);
                for (x, &dk) in row.iter_mut().zip(&d[..=i]) {
                    *x -= g * dk;
                }
            }
        }
        for kk in 0..=i {
            v[at(kk, i + 1)] = 0.0;
        }
    }
    for j in 0..n {
        d[j] = v[at(n - 1, j)];
        v[at(n - 1, j)] = 0.0;
    }
    v[at(n - 1, n - 1)] = 1.0;
    e[0] = 0.0;
}

/// `Σ aᵢ·bᵢ` over the common length, in four independent partial sums (a serial sum would
/// wait on each addition's latency).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a4, b4) = (a[..n].chunks_exact(4), b[..n].chunks_exact(4));
    let (ra, rb) = (a4.remainder(), b4.remainder());
    let mut acc = [0.0f64; 4];
    for (x, y) in a4.zip(b4) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Implicit QL iterations on the tridiagonal matrix (`d`, `e`), accumulating the
/// rotations into `v` (held transposed: eigenvector `i` in row `i`); on return `d` holds
/// the eigenvalues (unsorted).
fn tridiagonal_ql(v: &mut [f64], d: &mut [f64], e: &mut [f64], n: usize) {
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0;
    let mut tst1: f64 = 0.0;
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            for _iter in 0..100 {
                let mut g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for x in d[l + 2..n].iter_mut() {
                    *x -= h;
                }
                f += h;
                p = d[m];
                let (mut c, mut c2, mut c3) = (1.0, 1.0, 1.0);
                let el1 = e[l + 1];
                let (mut s, mut s2) = (0.0, 0.0);
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    // Columns i and i + 1 of v: rows i and i + 1 of w.
                    let (lo, hi) = v.split_at_mut((i + 1) * n);
                    for (vi, vi1) in lo[i * n..].iter_mut().zip(&mut hi[..n]) {
                        let hk = *vi1;
                        *vi1 = s * *vi + c * hk;
                        *vi = c * *vi - s * hk;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd(k: usize) -> Vec<f64> {
        let mut s = 7u64;
        let mut x = vec![0.0; k * k];
        for e in &mut x {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *e = ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5;
        }
        let mut g = vec![0.0; k * k];
        for i in 0..k {
            for j in 0..k {
                g[i * k + j] = (0..k).map(|p| x[p * k + i] * x[p * k + j]).sum::<f64>();
            }
            g[i * k + i] += 0.1;
        }
        g
    }

    #[test]
    fn eigen_handles_diagonal_and_repeated_values() {
        let k = 5;
        let mut a = vec![0.0; k * k];
        for (i, x) in [3.0, 1.0, 3.0, -2.0, 0.0].iter().enumerate() {
            a[i * k + i] = *x;
        }
        let (vals, vecs) = symmetric_eigen(&a, k);
        assert_eq!(vals, vec![3.0, 3.0, 1.0, 0.0, -2.0]);
        // Columns are orthonormal.
        for i in 0..k {
            for j in 0..k {
                let dot: f64 = (0..k).map(|r| vecs[r * k + i] * vecs[r * k + j]).sum();
                assert!((dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
        assert_eq!(symmetric_eigen(&[2.0], 1), (vec![2.0], vec![1.0]));
    }

    #[test]
    fn cholesky_factors_and_inverts() {
        for k in [1, 7, 40] {
            let a = spd(k);
            let r = cholesky_upper(&a, k, 1e12).expect("spd");
            // RᵀR = A, R upper triangular.
            for i in 0..k {
                for j in 0..k {
                    if i > j {
                        assert_eq!(r[i * k + j], 0.0);
                    }
                    let rtr: f64 = (0..k).map(|p| r[p * k + i] * r[p * k + j]).sum();
                    assert!((rtr - a[i * k + j]).abs() < 1e-10, "k {k} ({i},{j})");
                }
            }
            // R R⁻¹ = I.
            let inv = upper_inverse(&r, k);
            for i in 0..k {
                for j in 0..k {
                    let x: f64 = (0..k).map(|p| r[i * k + p] * inv[p * k + j]).sum();
                    assert!((x - if i == j { 1.0 } else { 0.0 }).abs() < 1e-10, "k {k} ({i},{j})");
                }
            }
        }
        // Not positive definite, or too ill-conditioned for the ratio: refused.
        assert!(cholesky_upper(&[1.0, 2.0, 2.0, 1.0], 2, 1e12).is_none());
        assert!(cholesky_upper(&[1.0, 0.0, 0.0, 1e-12], 2, 1e5).is_none());
        assert!(cholesky_upper(&[1.0, 0.0, 0.0, 1e-8], 2, 1e5).is_some());
    }

    #[test]
    fn eigen_diagonalizes() {
        for k in [2, 12, 61, 170] {
            check_eigen(k);
        }
    }

    /// Residual and orthonormality of the decomposition of `spd(k)`, with the upper
    /// triangle poisoned (NaN): only the lower triangle may be read.
    fn check_eigen(k: usize) {
        let g = spd(k);
        let mut poisoned = g.clone();
        for i in 0..k {
            for j in i + 1..k {
                poisoned[i * k + j] = f64::NAN;
            }
        }
        let (vals, vecs) = symmetric_eigen(&poisoned, k);
        assert!(vals.windows(2).all(|w| w[0] >= w[1]), "k {k}: not descending");
        let scale = vals[0].abs().max(1.0);
        // G v_i = λ_i v_i for every column, and the columns are orthonormal.
        for i in 0..k {
            for row in 0..k {
                let gv: f64 = (0..k).map(|p| g[row * k + p] * vecs[p * k + i]).sum();
                assert!((gv - vals[i] * vecs[row * k + i]).abs() < 1e-11 * scale, "k {k}");
            }
            for j in 0..k {
                let dot: f64 = (0..k).map(|r| vecs[r * k + i] * vecs[r * k + j]).sum();
                assert!((dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-11, "k {k} ({i},{j})");
            }
        }
    }
}
