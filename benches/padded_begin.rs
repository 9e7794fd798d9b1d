//! Host time of a padded decode step's start (`begin_padded_decode`: the step's checks,
//! page reservation, plan and the one write of its inputs) on the CPU, at SmolLM2-135M's
//! cache shape (30 layers, 9 query heads, 3 KV heads; D = 8 here: the host work does not
//! depend on it), B sequences of `CTX` tokens, dense and Quest. This is the host part a
//! replayed CUDA graph of the decode step leaves (issue 12's target: ≤ 100 µs at B = 64);
//! on CUDA the same code also pays the driver calls of its uploads. The `_crossing` cases
//! are steps where all 64 sequences start a page; `_reserved`, the same with the pages
//! held ahead (`SparseKvCache::reserve`, the engine's default). Since commit 236dbcf the
//! plan's expansion and the RoPE tables run in the step's first `attend`, not here: on
//! the CPU they were ~45 µs of this bench's time before, so its figures are not
//! comparable across that commit.
//!
//! `cargo bench --bench padded_begin`

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use spinkv::meta::PageTables;
use spinkv::partition::{by_name, SparseAlgorithm};
use spinkv::{CacheConfig, SeqId, SparseKvCache, SpinCache, StepInput};
use std::time::{Duration, Instant};

const LAYERS: usize = 30;
const HQ: usize = 9;
const HKV: usize = 3;
const D: usize = 8;
const CTX: usize = 250;
const CROSSING: usize = 256;

/// A cache of `b` sequences of `ctx` tokens; with `reserve`, each holds the pages of 64
/// more tokens (`SparseKvCache::reserve`, as the engine does at admission).
fn prefilled(b: usize, ctx: usize, algo: Box<dyn SparseAlgorithm>, reserve: bool) -> (SpinCache, Vec<SeqId>) {
    let mut cfg = CacheConfig::new(LAYERS, HQ, HKV, D);
    cfg.max_seq_len = ctx + 64;
    cfg.max_sequences = b;
    let cfg = cfg.with_page_size(16).with_token_capacity(b * (ctx + 64), 1.0);
    let mut cache = SpinCache::new_boxed(cfg, algo).expect("cache");
    let seqs: Vec<SeqId> = (0..b).map(|_| cache.add_sequence().expect("seq")).collect();
    if reserve {
        for &s in &seqs {
            cache.reserve(s, ctx + 64).expect("reserve");
        }
    }
    let dev = Device::Cpu;
    let inputs: Vec<StepInput> = seqs.iter().map(|&seq| StepInput { seq, new_tokens: ctx }).collect();
    let t = b * ctx;
    let q = Tensor::randn(0f32, 1.0, (t, HQ, D), &dev).expect("q");
    let k = Tensor::randn(0f32, 1.0, (t, HKV, D), &dev).expect("k");
    cache.begin_step(&inputs).expect("prefill");
    for layer in 0..LAYERS {
        cache.attend(layer, &q, &k, &k).expect("prefill attend");
    }
    cache.end_step().expect("end");
    (cache, seqs)
}

fn padded_begin(c: &mut Criterion) {
    let mut group = c.benchmark_group("padded_begin_cpu");
    group.sample_size(20);
    let points = [1usize, 16, 64]
        .into_iter()
        .flat_map(|b| [(b, CTX, "dense"), (b, CTX, "quest")]);
    let crossing = [
        (64, CROSSING, "dense_crossing"),
        (64, CROSSING, "quest_crossing"),
        (64, CROSSING, "dense_crossing_reserved"),
        (64, CROSSING, "quest_crossing_reserved"),
    ];
    for (b, ctx, id) in points.chain(crossing) {
        let name = id.split('_').next().expect("name");
        let reserve = id.ends_with("_reserved");
        let (mut cache, seqs) = prefilled(b, ctx, by_name(name, 1024).expect("algo"), reserve);
        let inputs: Vec<StepInput> = seqs.iter().map(|&seq| StepInput { seq, new_tokens: 1 }).collect();
        let shape = cache.padded_shape(&inputs).expect("padded shape");
        group.bench_with_input(BenchmarkId::new(id, b), &b, |bch, _| {
            bch.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let t0 = Instant::now();
                    cache.begin_padded_decode(&inputs, shape).expect("begin");
                    spent += t0.elapsed();
                    cache.abort_step().expect("abort");
                }
                spent
            })
        });
    }
    group.finish();
}

/// One decode step's table work when all B = 64 sequences of 8K tokens start a new page
/// together: a page pushed to each sequence's 90 directories, then the change log
/// mirrored to device tables (on the CPU: the host side of `DeviceTables::apply`), at a
/// leaf boundary (page 512: 5760 new leaves) and inside a leaf (page 513).
fn table_crossing(c: &mut Criterion) {
    use spinkv::meta::DeviceTables;
    let (b, dirs) = (64u64, LAYERS * HKV);
    let mut group = c.benchmark_group("table_crossing_b64_8k");
    group.sample_size(10);
    for (name, pages) in [("leaf_boundary", 512usize), ("inside_leaf", 513)] {
        let mut t = PageTables::new(LAYERS, HKV);
        let mut dev = DeviceTables::with_capacity(b as usize * dirs, 16, b as usize * dirs * 16, dirs, &Device::Cpu)
            .expect("device tables");
        let mut slot = 0u32;
        for seq in 0..b {
            t.add_sequence(seq);
            dev.add_sequence(seq).expect("row");
        }
        for _ in 0..pages {
            for seq in 0..b {
                let slots: Vec<u32> = (slot..slot + dirs as u32).collect();
                slot += dirs as u32;
                t.push_page(seq, &slots).expect("push");
            }
        }
        dev.apply(&mut t).expect("apply");
        group.bench_function(name, |bch| {
            bch.iter_batched(
                || (t.clone(), dev.clone()),
                |(mut t, mut dev)| {
                    for seq in 0..b {
                        let slots: Vec<u32> = (0..dirs as u32).collect();
                        t.push_page(seq, &slots).expect("push");
                    }
                    dev.apply(&mut t).expect("apply");
                    (t, dev)
                },
                criterion::BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, padded_begin, table_crossing);
criterion_main!(benches);
