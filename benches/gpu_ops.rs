//! Criterion benches of the CUDA ops at the Llama-3.1-8B layer shape (32 q heads, 8 KV
//! heads, D = 128, bf16, page 16), 32K context, batch 8, budget 2048 tokens: sparse
//! attention, dense attention, Quest scoring + top-k, and the whole Quest step of one
//! layer. Each iteration synchronizes the device (wall-clock time of the GPU work plus
//! launch overhead); `examples/gpu_bench.rs` prints the full table with CUDA-event and
//! CUDA-graph timings.
//!
//! `cargo bench --features cuda --bench gpu_ops` (needs a GPU).

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use spinkv::ops::{self, PageList};

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;
const P: usize = 16;

fn bench(c: &mut Criterion) {
    let dev = Device::new_cuda(0).expect("a CUDA device");
    let (l, b, kpages) = (32768usize, 8usize, 2048 / P);
    let np = l / P;
    let slots = b * HKV * np;
    let mut r = rand::rngs::StdRng::seed_from_u64(3);
    let rnd = |shape: &[usize]| -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &dev)
            .and_then(|t| t.to_dtype(DType::BF16))
            .expect("random tensor")
    };
    let pool = rnd(&[slots, 2, P, D]);
    let meta = rnd(&[slots, 2, D]);
    let q = rnd(&[b, HQ, D]);
    let knew = rnd(&[b, HKV, D]);
    let vnew = rnd(&[b, HKV, D]);
    let mut perm: Vec<u32> = (0..slots as u32).collect();
    perm.shuffle(&mut r);
    let cand = Tensor::from_vec(perm.clone(), (b, HKV, np), &dev).expect("candidates");
    let dense: Vec<u32> = perm
        .iter()
        .enumerate()
        .flat_map(|(i, &s)| [s, (i % np) as u32])
        .collect();
    let mut sparse = Vec::new();
    for row in 0..b * HKV {
        let mut mid: Vec<u32> = (1..np as u32 - 2).collect();
        mid.shuffle(&mut r);
        let mut sel = vec![0, np as u32 - 2, np as u32 - 1];
        sel.extend_from_slice(&mid[..kpages - 3]);
        sel.sort_unstable();
        for lp in sel {
            sparse.push(perm[row * np + lp as usize]);
            sparse.push(lp);
        }
    }
    let queries: Vec<u32> = (0..b).flat_map(|i| [i as u32, (l - 1) as u32]).collect();
    let queries = Tensor::from_vec(queries, (b, 2), &dev).expect("queries");
    let kv_limit = Tensor::from_vec(vec![l as u32; b], b, &dev).expect("kv_limit");
    let list = |pages: Vec<u32>, n: usize| PageList {
        pages: Tensor::from_vec(pages, (b, HKV, n, 2), &dev).expect("pages"),
        queries: queries.clone(),
        kv_limit: kv_limit.clone(),
    };
    let dense_list = list(dense, np);
    let sparse_list = list(sparse, kpages);
    let dst: Vec<u32> = (0..b * HKV)
        .map(|row| perm[row * np + np - 1] * P as u32 + (P - 1) as u32)
        .collect();
    let dst = Tensor::from_vec(dst, (b, HKV), &dev).expect("dst");
    let scale = 1.0 / (D as f32).sqrt();
    let sync = || dev.synchronize().expect("synchronize");

    let mut g = c.benchmark_group("cuda_32k_b8_bf16");
    g.bench_function("sparse_attention_2048", |bch| {
        bch.iter(|| {
            ops::sparse_paged_attention(&q, &pool, &sparse_list, scale).expect("attention");
            sync();
        })
    });
    g.bench_function("dense_attention", |bch| {
        bch.iter(|| {
            ops::sparse_paged_attention(&q, &pool, &dense_list, scale).expect("attention");
            sync();
        })
    });
    g.bench_function("quest_score_topk", |bch| {
        bch.iter(|| {
            let s = ops::quest_page_scores(&q, &meta, &cand, 1, 2).expect("scores");
            ops::topk_indices(&s.reshape((b * HKV, np)).expect("reshape"), kpages).expect("topk");
            sync();
        })
    });
    g.bench_function("quest_step", |bch| {
        bch.iter(|| {
            ops::paged_append(&pool, &knew, &vnew, &dst).expect("append");
            ops::quest_meta_update(&meta, &knew, &dst, P).expect("meta");
            let s = ops::quest_page_scores(&q, &meta, &cand, 1, 2).expect("scores");
            let sel = ops::topk_indices(&s.reshape((b * HKV, np)).expect("reshape"), kpages)
                .and_then(|t| t.reshape((b, HKV, kpages)).map_err(Into::into))
                .expect("topk");
            let pages = spinkv::ops::selection_to_pages(&cand, &sel).expect("pages");
            let l = PageList {
                pages,
                queries: queries.clone(),
                kv_limit: kv_limit.clone(),
            };
            ops::sparse_paged_attention(&q, &pool, &l, scale).expect("attention");
            sync();
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
