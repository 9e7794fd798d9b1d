//! Randomized truncated SVD against matrices with a known spectrum: at rank r the
//! reconstruction error must match the SVD's theoretical tail sqrt(Σ_{i>r} σᵢ²) (it
//! cannot be smaller, by Eckart–Young), the leading singular values must be recovered,
//! and at full rank the input must come back to float rounding.

#![allow(clippy::needless_range_loop)]

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use spinkv::linalg::{randomized_low_rank, randomized_low_rank_batch, randomized_low_rank_stacked, LowRankOptions};

/// `[m, k]` matrix with orthonormal columns (Gram–Schmidt twice, f64).
fn orthonormal(r: &mut rand::rngs::StdRng, m: usize, k: usize) -> Vec<f64> {
    let x = randn(r, &[m, k], 1.0).to_dtype(DType::F64).unwrap();
    let mut a = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for _ in 0..2 {
        for j in 0..k {
            for p in 0..j {
                let dot: f64 = (0..m).map(|i| a[i * k + j] * a[i * k + p]).sum();
                for i in 0..m {
                    a[i * k + j] -= dot * a[i * k + p];
                }
            }
            let norm: f64 = (0..m).map(|i| a[i * k + j] * a[i * k + j]).sum::<f64>().sqrt();
            for i in 0..m {
                a[i * k + j] /= norm;
            }
        }
    }
    a
}

/// `U diag(σ) Vᵀ` as f32 `[m, n]`.
fn with_spectrum(seed: u64, m: usize, n: usize, sigma: &[f64]) -> Tensor {
    let mut r = rng(seed);
    let u = orthonormal(&mut r, m, n);
    let v = orthonormal(&mut r, n, n);
    let mut x = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            x[i * n + j] = (0..n).map(|p| u[i * n + p] * sigma[p] * v[j * n + p]).sum();
        }
    }
    Tensor::from_vec(x, (m, n), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn frob_err(x: &Tensor, left: &Tensor, right: &Tensor) -> f64 {
    let back = left.matmul(right).unwrap();
    let diff = (x.to_dtype(DType::F64).unwrap() - back.to_dtype(DType::F64).unwrap()).unwrap();
    diff.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

#[test]
fn rank_r_error_matches_the_svd_tail() {
    let (m, n) = (300, 96);
    for (seed, decay) in [(1u64, 0.85f64), (2, 0.95), (3, 0.7)] {
        let sigma: Vec<f64> = (0..n).map(|i| 10.0 * decay.powi(i as i32)).collect();
        let x = with_spectrum(seed, m, n, &sigma);
        for rank in [8, 20, 48] {
            let lr = randomized_low_rank(&x, rank, LowRankOptions::default()).unwrap();
            // The rank may only shrink where the spectrum falls below rounding.
            let got = lr.rank();
            assert!(
                got == rank || (got < rank && sigma[got] < 1e-6 * sigma[0]),
                "rank {got} of {rank}"
            );
            assert_eq!(lr.left.dims(), &[m, got]);
            assert_eq!(lr.right.dims(), &[got, n]);
            // The left factor has orthonormal columns whichever orthonormalization ran
            // (CholQR2 at decay 0.95, where the blocks are well conditioned; SVQB at 0.7).
            let l = lr.left.to_dtype(DType::F64).unwrap();
            let gram = l.t().unwrap().matmul(&l).unwrap().to_vec2::<f64>().unwrap();
            for (i, row) in gram.iter().enumerate() {
                for (j, g) in row.iter().enumerate() {
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((g - want).abs() < 1e-5, "decay {decay} rank {rank}: LᵀL[{i},{j}] = {g}");
                }
            }
            let tail: f64 = sigma[rank..].iter().map(|s| s * s).sum::<f64>().sqrt();
            let err = frob_err(&x, &lr.left, &lr.right);
            if tail < 1e-4 * sigma[0] {
                // The tail is below the f32 rounding of the input itself.
                assert!(
                    err < 1e-5 * sigma[0],
                    "decay {decay} rank {rank}: error {err} at the f32 floor"
                );
                continue;
            }
            let ratio = err / tail;
            assert!(
                (0.999..=1.05).contains(&ratio),
                "decay {decay} rank {rank}: error {err:.6} vs SVD tail {tail:.6} (ratio {ratio:.4})"
            );
            for i in 0..got.min(8) {
                let rel = (lr.singular_values[i] - sigma[i]).abs() / sigma[i];
                assert!(rel < 1e-3, "σ{i}: {} vs {}", lr.singular_values[i], sigma[i]);
            }
        }
    }
}

#[test]
fn full_rank_reproduces_the_matrix() {
    let (m, n) = (200, 64);
    let x = randn(&mut rng(11), &[m, n], 1.0);
    let lr = randomized_low_rank(&x, n, LowRankOptions::default()).unwrap();
    let norm = x.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
    let rel = frob_err(&x, &lr.left, &lr.right) / norm;
    assert!(rel < 1e-5, "full-rank relative error {rel}");
    // Rank above min(m, n) is capped, short matrices (m < n) work too.
    let short = randn(&mut rng(12), &[20, n], 1.0);
    let lr = randomized_low_rank(&short, 160, LowRankOptions::default()).unwrap();
    assert_eq!(lr.rank(), 20);
    let norm = short
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt() as f64;
    assert!(frob_err(&short, &lr.left, &lr.right) / norm < 1e-5);
}

#[test]
fn rank_deficient_input_is_handled() {
    // Rank 5 matrix asked for rank 16: the extra directions carry ~0 energy.
    let (m, n) = (120, 40);
    let mut sigma = vec![0.0; n];
    for (i, s) in sigma.iter_mut().take(5).enumerate() {
        *s = 5.0 - i as f64;
    }
    let x = with_spectrum(4, m, n, &sigma);
    let lr = randomized_low_rank(&x, 16, LowRankOptions::default()).unwrap();
    let err = frob_err(&x, &lr.left, &lr.right);
    assert!(err < 1e-4, "rank-deficient error {err}");
    assert!(lr.singular_values.iter().all(|s| s.is_finite()));
}

#[test]
fn bad_inputs_are_errors() {
    let x = Tensor::zeros((4, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let e = randomized_low_rank(&x, 2, LowRankOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("randomized_low_rank") && e.contains("[4, 4, 4]"), "{e}");
    let x = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(randomized_low_rank(&x, 0, LowRankOptions::default()).is_err());
    let nan = Tensor::from_vec(vec![f32::NAN; 16], (4, 4), &Device::Cpu).unwrap();
    let e = randomized_low_rank(&nan, 2, LowRankOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("non-finite"), "{e}");
}

#[test]
fn a_batch_equals_its_matrices_one_by_one() {
    // Well conditioned (the CholQR path), rank deficient (SVQB), and other shapes.
    let mut sigma = vec![0.0; 40];
    for (i, s) in sigma.iter_mut().take(5).enumerate() {
        *s = 5.0 - i as f64;
    }
    // Same-shape matrices are stacked: three [120, 40] ones (the rank-deficient one in
    // the middle leaves its stack for SVQB) and two [150, 48] ones, interleaved.
    let xs = [
        randn(&mut rng(21), &[150, 48], 1.0),
        randn(&mut rng(23), &[120, 40], 1.0),
        with_spectrum(4, 120, 40, &sigma),
        randn(&mut rng(22), &[33, 70], 1.0),
        randn(&mut rng(24), &[150, 48], 1.0),
        with_spectrum(5, 200, 64, &(0..64).map(|i| 0.8f64.powi(i)).collect::<Vec<_>>()),
        randn(&mut rng(25), &[120, 40], 2.0),
    ];
    let refs: Vec<&Tensor> = xs.iter().collect();
    let batch = randomized_low_rank_batch(&refs, 16, LowRankOptions::default()).unwrap();
    assert_eq!(batch.len(), xs.len());
    for (i, (x, b)) in xs.iter().zip(&batch).enumerate() {
        let one = randomized_low_rank(x, 16, LowRankOptions::default()).unwrap();
        // Equal to rounding: a stack's batched products may sum in another order.
        assert_eq!(one.singular_values.len(), b.singular_values.len(), "matrix {i}");
        for (s1, s2) in one.singular_values.iter().zip(&b.singular_values) {
            assert!(
                (s1 - s2).abs() <= 1e-9 * one.singular_values[0],
                "matrix {i}: σ {s1} vs {s2}"
            );
        }
        let close = |a: &Tensor, b: &Tensor| {
            assert_eq!(a.dims(), b.dims(), "matrix {i}");
            let (a, b) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-4 * scale, "matrix {i}: {x} vs {y}");
            }
        };
        close(&one.left, &b.left);
        close(&one.right, &b.right);
        // And it is a factorization of its own matrix, not of a neighbour's.
        let norm = x.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
        assert!(frob_err(x, &b.left, &b.right) <= 1.0001 * frob_err(x, &one.left, &one.right) + 1e-6 * norm);
    }
    // Same shape, mixed dtypes: stacked after the cast, each equal to its own run.
    let x64 = xs[1].to_dtype(DType::F64).unwrap();
    let mixed = randomized_low_rank_batch(&[&xs[6], &x64], 16, LowRankOptions::default()).unwrap();
    let one = randomized_low_rank(&x64, 16, LowRankOptions::default()).unwrap();
    assert!((mixed[1].singular_values[0] - one.singular_values[0]).abs() <= 1e-9 * one.singular_values[0]);
    assert!((mixed[0].singular_values[0] - batch[6].singular_values[0]).abs() <= 1e-9 * batch[6].singular_values[0]);
    // A pre-stacked input gives the same factors, stack by stack; an empty stack adds none.
    let stack = Tensor::stack(&[&xs[1], &xs[6]], 0).unwrap();
    let empty = Tensor::zeros((0, 150, 48), DType::F32, &Device::Cpu).unwrap();
    let stacked = randomized_low_rank_stacked(&[&empty, &stack], 16, LowRankOptions::default()).unwrap();
    assert_eq!(stacked.len(), 2);
    for (got, want) in stacked.iter().zip([&batch[1], &batch[6]]) {
        assert_eq!(got.singular_values, want.singular_values);
    }
    let e = randomized_low_rank_stacked(&[&xs[0]], 4, LowRankOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("[b, m, n]") && e.contains("[150, 48]"), "{e}");
    // An empty batch is empty; one bad matrix fails the batch with its shape named.
    assert!(randomized_low_rank_batch(&[], 4, LowRankOptions::default())
        .unwrap()
        .is_empty());
    let bad = Tensor::zeros((3, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let e = randomized_low_rank_batch(&[&xs[0], &bad], 4, LowRankOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("[3, 3, 3]"), "{e}");
}

#[test]
fn the_factorization_marks_its_host_parts() {
    // The spans serve_bench --host-timing prints for ShadowKV's compression step.
    spinkv::host_timing::enable(true);
    let x = randn(&mut rng(31), &[90, 24], 1.0);
    randomized_low_rank(&x, 8, LowRankOptions::default()).unwrap();
    let labels: Vec<(&str, u64)> = spinkv::host_timing::report()
        .into_iter()
        .map(|s| (s.label, s.count))
        .collect();
    for want in ["low_rank.read", "low_rank.cholesky", "low_rank.eigen"] {
        assert!(
            labels.iter().any(|&(l, n)| l == want && n >= 1),
            "{want} missing: {labels:?}"
        );
    }
}

/// The factors of a stacked factorization each own only their own memory: a factor that
/// kept a view of (or a whole-storage clone under) the stack would hold `b` times its size,
/// and a stack of `b` such factors `b²` (ShadowKV keeps them until the sequence leaves).
#[test]
fn stacked_factors_own_only_their_memory() {
    let x = randn(&mut rng(31), &[6, 90, 24], 1.0);
    let factors = randomized_low_rank_stacked(&[&x], 8, LowRankOptions::default()).unwrap();
    assert_eq!(factors.len(), 6);
    for (i, f) in factors.iter().enumerate() {
        for (what, t) in [("left", &f.left), ("right", &f.right)] {
            let (storage, layout) = t.storage_and_layout();
            let held = match &*storage {
                candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => v.len(),
                other => panic!("factor {i} {what}: unexpected storage {:?}", other.dtype()),
            };
            assert_eq!(
                (held, layout.start_offset()),
                (t.elem_count(), 0),
                "factor {i} {what} {:?} holds {held} elements",
                t.dims()
            );
        }
    }
}
