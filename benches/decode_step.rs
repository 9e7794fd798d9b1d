//! One decode step (one layer: append + select + attend) on the CPU: Dense vs Quest at
//! budgets 512 and 1024 and InfLLM / ShadowKV at budget 1024 (`partition::by_name`),
//! contexts 4K and 16K. Shape: 8 query heads, 2 KV heads, D = 128, page 16 (ShadowKV: 8),
//! f32, everything resident in the fast tier. ShadowKV's one-time compression of the
//! prefill happens in the warm-up; `low_rank` benches it.
//!
//! `cargo bench --bench decode_step`

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use spinkv::partition::{by_name, Dense, Quest, QuestConfig, SparseAlgorithm};
use spinkv::{CacheConfig, SparseKvCache, SpinCache, StepInput};

const HQ: usize = 8;
const HKV: usize = 2;
const D: usize = 128;

fn prefilled(ctx: usize, algo: Box<dyn SparseAlgorithm>) -> (SpinCache, spinkv::SeqId) {
    let mut cfg = CacheConfig::new(1, HQ, HKV, D);
    cfg.max_seq_len = ctx + 16;
    let cfg = cfg
        .with_token_capacity(ctx + 32, 1.0)
        .with_page_size(algo.page_size_hint().unwrap_or(16));
    let mut cache = SpinCache::new_boxed(cfg, algo).expect("cache");
    let seq = cache.add_sequence().expect("seq");
    let dev = Device::Cpu;
    cache.begin_step(&[StepInput { seq, new_tokens: ctx }]).expect("step");
    let q = Tensor::randn(0f32, 1.0, (ctx, HQ, D), &dev).expect("q");
    let k = Tensor::randn(0f32, 1.0, (ctx, HKV, D), &dev).expect("k");
    let v = Tensor::randn(0f32, 1.0, (ctx, HKV, D), &dev).expect("v");
    cache.attend(0, &q, &k, &v).expect("prefill");
    cache.end_step().expect("end");
    (cache, seq)
}

fn decode_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_step_cpu");
    group.sample_size(20);
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (1, HQ, D), &dev).expect("q");
    let k = Tensor::randn(0f32, 1.0, (1, HKV, D), &dev).expect("k");
    let v = Tensor::randn(0f32, 1.0, (1, HKV, D), &dev).expect("v");
    for ctx in [4096usize, 16384] {
        let algos: Vec<(String, Box<dyn SparseAlgorithm>)> = vec![
            ("dense".into(), Box::new(Dense::new())),
            (
                "quest_512".into(),
                Box::new(Quest::new(QuestConfig {
                    budget_tokens: 512,
                    dense_layers: 0,
                    ..Default::default()
                })),
            ),
            (
                "quest_1024".into(),
                Box::new(Quest::new(QuestConfig {
                    budget_tokens: 1024,
                    dense_layers: 0,
                    ..Default::default()
                })),
            ),
            ("infllm_1024".into(), by_name("infllm", 1024).expect("infllm")),
            ("shadowkv_1024".into(), by_name("shadowkv", 1024).expect("shadowkv")),
        ];
        for (name, algo) in algos {
            let (mut cache, seq) = prefilled(ctx, algo);
            group.bench_with_input(BenchmarkId::new(name, ctx), &ctx, |b, _| {
                b.iter(|| {
                    cache.begin_step(&[StepInput { seq, new_tokens: 1 }]).expect("step");
                    let out = cache.attend(0, &q, &k, &v).expect("attend");
                    // Roll back so every iteration decodes at the same context length.
                    cache.abort_step().expect("abort");
                    out
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, decode_step);
criterion_main!(benches);
