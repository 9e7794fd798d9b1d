//! ShadowKV's one-time prefill compression per layer and sequence: the randomized
//! truncated SVD of pre-RoPE keys `[L, Hkv·D]` (SmolLM2's Hkv·D = 192, rank 160) and the
//! small symmetric eigen solve inside it, on the CPU.
//!
//! `cargo bench --bench low_rank`

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use spinkv::linalg::{randomized_low_rank, randomized_low_rank_batch, symmetric_eigen, LowRankOptions};

fn low_rank(c: &mut Criterion) {
    let mut group = c.benchmark_group("low_rank_cpu");
    group.sample_size(10);
    for m in [2048usize, 8192] {
        let x = Tensor::randn(0f32, 1.0, (m, 192), &Device::Cpu).expect("x");
        group.bench_with_input(BenchmarkId::new("randomized_svd_192_rank160", m), &m, |b, _| {
            b.iter(|| randomized_low_rank(&x, 160, LowRankOptions::default()).expect("svd"))
        });
    }
    // A batch of same-shape matrices, as ShadowKV factorizes the sequences of a step.
    let xs: Vec<Tensor> = (0..16)
        .map(|_| Tensor::randn(0f32, 1.0, (512, 192), &Device::Cpu).expect("x"))
        .collect();
    let refs: Vec<&Tensor> = xs.iter().collect();
    group.bench_function(BenchmarkId::new("randomized_svd_batch16_512x192_rank160", 16), |b| {
        b.iter(|| randomized_low_rank_batch(&refs, 160, LowRankOptions::default()).expect("svd"))
    });
    let k = 170;
    let a: Vec<f64> = (0..k * k)
        .map(|i| {
            let (r, c) = (i / k, i % k);
            ((r * c + r + c) % 97) as f64 / 97.0
        })
        .collect();
    group.bench_function(BenchmarkId::new("symmetric_eigen", k), |b| {
        b.iter(|| symmetric_eigen(&a, k))
    });
    group.finish();
}

criterion_group!(benches, low_rank);
criterion_main!(benches);
