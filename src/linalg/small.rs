//! Small dense f64 factorization in plain Rust (row-major `k × k` matrices): the cyclic
//! Jacobi eigen solver. Used on `k ≈ rank`
//! matrices only, where O(k³) host work is negligible.

/// Eigen-decomposition of a symmetric `k × k` matrix by cyclic Jacobi rotations.
/// Returns `(values, vectors)` sorted by value, descending; `vectors` is row-major with
/// eigenvector `i` in column `i`.
pub fn symmetric_eigen(a: &[f64], k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = a.to_vec();
    let mut v = vec![0.0; k * k];
    for i in 0..k {
        v[i * k + i] = 1.0;
    }
    let norm: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    for _sweep in 0..60 {
        let off: f64 = (0..k)
            .flat_map(|i| (0..k).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * k + j] * a[i * k + j])
            .sum::<f64>()
            .sqrt();
        if off <= 1e-15 * norm.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..k {
            for q in p + 1..k {
                let apq = a[p * k + q];
                if apq.abs() <= f64::MIN_POSITIVE {
                    continue;
                }
                let theta = (a[q * k + q] - a[p * k + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for i in 0..k {
                    let (aip, aiq) = (a[i * k + p], a[i * k + q]);
                    a[i * k + p] = c * aip - s * aiq;
                    a[i * k + q] = s * aip + c * aiq;
                }
                for i in 0..k {
                    let (api, aqi) = (a[p * k + i], a[q * k + i]);
                    a[p * k + i] = c * api - s * aqi;
                    a[q * k + i] = s * api + c * aqi;
                }
                for i in 0..k {
                    let (vip, viq) = (v[i * k + p], v[i * k + q]);
                    v[i * k + p] = c * vip - s * viq;
                    v[i * k + q] = s * vip + c * viq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&x, &y| a[y * k + y].total_cmp(&a[x * k + x]));
    let values = order.iter().map(|&i| a[i * k + i]).collect();
    let mut vectors = vec![0.0; k * k];
    for (col, &i) in order.iter().enumerate() {
        for row in 0..k {
            vectors[row * k + col] = v[row * k + i];
        }
    }
    (values, vectors)
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
    fn jacobi_eigen_diagonalizes() {
        let k = 12;
        let g = spd(k);
        let (vals, vecs) = symmetric_eigen(&g, k);
        assert!(vals.windows(2).all(|w| w[0] >= w[1]));
        // G v_i = λ_i v_i for every column.
        for i in 0..k {
            for row in 0..k {
                let gv: f64 = (0..k).map(|p| g[row * k + p] * vecs[p * k + i]).sum();
                assert!((gv - vals[i] * vecs[row * k + i]).abs() < 1e-10);
            }
        }
    }
}
