//! InfLLM and ShadowKV through the cache: with a budget covering the context InfLLM
//! equals Dense, ShadowKV at full rank equals Dense within float tolerance (its selected
//! chunks are attended with keys rebuilt from the factor); on planted inputs both select
//! the planted partitions; aborted steps roll their metadata back; bad configurations are
//! construction errors.

#![allow(clippy::needless_range_loop)]

mod common;

use candle_core::{DType, Tensor};
use common::harness::random_step;
use common::*;
use spinkv::partition::{by_name, Dense, InfLlm, InfLlmConfig, ShadowKv, ShadowKvConfig, SparseAlgorithm};
use spinkv::{CacheConfig, SeqId, SparseKvCache, SpinCache, StepInput, StepStats};

const THETA: f64 = 10_000.0;

fn cfg(hq: usize, hkv: usize, d: usize, page: usize) -> CacheConfig {
    let mut c = CacheConfig::new(2, hq, hkv, d);
    c.rope_theta = THETA;
    c.page_size = page;
    c.with_token_capacity(4096, 1.0)
}

/// Runs two sequences (prefills of `prefill[i]` tokens, the first one in two chunks), then
/// `decode` batched decode steps; returns every decode step's output and the totals.
fn run_schedule(
    c: &CacheConfig,
    algo: Box<dyn SparseAlgorithm>,
    prefill: [usize; 2],
    decode: usize,
    seed: u64,
) -> (Vec<Tensor>, StepStats) {
    let mut cache = SpinCache::new_boxed(c.clone(), algo).unwrap();
    let mut r = rng(seed);
    let s: Vec<SeqId> = (0..2).map(|_| cache.add_sequence().unwrap()).collect();
    // The last layer's output of a step with fresh random q/k/v (the shared harness).
    let mut step = |cache: &mut SpinCache, inputs: &[StepInput]| -> Tensor {
        random_step(cache, inputs, &mut r).pop().unwrap().out
    };
    let first = prefill[0] / 2;
    step(
        &mut cache,
        &[StepInput {
            seq: s[0],
            new_tokens: first,
        }],
    );
    step(
        &mut cache,
        &[
            StepInput {
                seq: s[0],
                new_tokens: prefill[0] - first,
            },
            StepInput {
                seq: s[1],
                new_tokens: prefill[1],
            },
        ],
    );
    let mut outs = Vec::new();
    for _ in 0..decode {
        outs.push(step(
            &mut cache,
            &[
                StepInput {
                    seq: s[0],
                    new_tokens: 1,
                },
                StepInput {
                    seq: s[1],
                    new_tokens: 1,
                },
            ],
        ));
    }
    cache.verify_accounting().unwrap();
    for id in s {
        cache.remove_sequence(id).unwrap();
    }
    assert_eq!(
        cache.pool_usage().host_used,
        0,
        "removing the sequences frees every page"
    );
    (outs, cache.stats())
}

#[test]
fn infllm_with_budget_over_context_equals_dense() {
    let c = cfg(6, 2, 64, 16);
    let inf = InfLlm::new(InfLlmConfig {
        block_tokens: 32,
        sink_tokens: 16,
        window_tokens: 64,
        topk_blocks: 100,
        repr_topk: 4,
    })
    .unwrap();
    let (a, sa) = run_schedule(&c, Box::new(inf), [300, 170], 40, 3);
    let (b, _) = run_schedule(&c, Box::new(Dense::new()), [300, 170], 40, 3);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let e = max_abs_diff(x, y);
        assert!(e < 1e-5, "decode step {i}: infllm vs dense max |Δ| {e}");
    }
    assert!((sa.attended_fraction() - 1.0).abs() < 1e-12);
}

#[test]
fn shadowkv_at_full_rank_equals_dense() {
    // Hkv·D = 2 · 32 = 64 = rank: the factor reproduces the keys.
    let c = cfg(4, 2, 32, 8);
    let sk = ShadowKv::new(ShadowKvConfig {
        chunk_tokens: 8,
        rank: 64,
        sparse_budget_tokens: 4096,
        outlier_chunks: 3,
        window_tokens: 32,
    })
    .unwrap();
    let (a, sa) = run_schedule(&c, Box::new(sk), [300, 170], 20, 4);
    let (b, _) = run_schedule(&c, Box::new(Dense::new()), [300, 170], 20, 4);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let e = rel_err(x, y);
        assert!(
            e < 1e-4,
            "decode step {i}: shadowkv(full rank) vs dense relative error {e}"
        );
    }
    assert!(sa.rebuilt_pages > 0, "the rebuilt-key path ran: {sa:?}");
    assert!((sa.attended_fraction() - 1.0).abs() < 1e-12);
}

#[test]
fn shadowkv_error_shrinks_with_rank() {
    // Random keys have a flat spectrum: lower ranks lose more of them, so the output moves
    // away from Dense as the rank drops, and comes back at full rank.
    let c = cfg(4, 2, 32, 8);
    let (dense, _) = run_schedule(&c, Box::new(Dense::new()), [200, 120], 2, 5);
    let errs: Vec<f64> = [8, 32, 64]
        .iter()
        .map(|&rank| {
            let sk = ShadowKv::new(ShadowKvConfig {
                rank,
                sparse_budget_tokens: 4096,
                outlier_chunks: 3,
                ..Default::default()
            })
            .unwrap();
            let (a, _) = run_schedule(&c, Box::new(sk), [200, 120], 2, 5);
            rel_err(&a[1], &dense[1])
        })
        .collect();
    assert!(
        errs[0] > errs[1] && errs[1] > errs[2],
        "errors by rank 8/32/64: {errs:?}"
    );
    assert!(errs[0] > 1e-2 && errs[2] < 1e-4, "errors by rank 8/32/64: {errs:?}");
}

/// A context of `ctx` tokens whose keys over `planted` positions align (after RoPE) with
/// the decode query; returns the layer-1 selections per KV head of the decode step.
fn planted_selection(
    c: &CacheConfig,
    algo: Box<dyn SparseAlgorithm>,
    ctx: usize,
    planted: std::ops::Range<usize>,
) -> Vec<Vec<u32>> {
    let (hq, hkv, d) = (c.num_q_heads, c.num_kv_heads, c.head_dim);
    let mut r = rng(77);
    let mut cache = SpinCache::new_boxed(c.clone(), algo).unwrap();
    cache.set_trace(true);
    let seq = cache.add_sequence().unwrap();
    let q1 = randn(&mut r, &[1, 1, d], 1.0);
    let q = q1.broadcast_as((1, hq, d)).unwrap().contiguous().unwrap();
    let mut k = randn(&mut r, &[ctx, hkv, d], 0.3).to_dtype(DType::F64).unwrap();
    for p in planted {
        let aligned = rope_f64(&q1, &[(ctx - p) as f64], THETA).affine(3.0, 0.0).unwrap();
        let row = aligned.broadcast_as((1, hkv, d)).unwrap().contiguous().unwrap();
        k = k.slice_assign(&[p..p + 1, 0..hkv, 0..d], &row).unwrap();
    }
    let k = k.to_dtype(DType::F32).unwrap();
    let v = randn(&mut r, &[ctx, hkv, d], 1.0);
    let qp = randn(&mut r, &[ctx, hq, d], 0.3);
    cache.begin_step(&[StepInput { seq, new_tokens: ctx }]).unwrap();
    for layer in 0..2 {
        cache.attend(layer, &qp, &k, &v).unwrap();
    }
    cache.end_step().unwrap();
    cache.begin_step(&[StepInput { seq, new_tokens: 1 }]).unwrap();
    let kn = randn(&mut r, &[1, hkv, d], 0.3);
    let vn = randn(&mut r, &[1, hkv, d], 1.0);
    for layer in 0..2 {
        cache.attend(layer, &q, &kn, &vn).unwrap();
    }
    cache.end_step().unwrap();
    cache
        .take_trace()
        .into_iter()
        .filter(|t| t.layer == 1)
        .map(|t| t.pages)
        .collect()
}

#[test]
fn infllm_finds_the_planted_block() {
    let c = cfg(6, 2, 64, 16);
    let inf = InfLlm::new(InfLlmConfig {
        block_tokens: 32,
        sink_tokens: 16,
        window_tokens: 64,
        topk_blocks: 2,
        repr_topk: 4,
    })
    .unwrap();
    // Block 9 = tokens 288..320 = pages 18, 19.
    let sel = planted_selection(&c, Box::new(inf), 1000, 288..320);
    assert_eq!(sel.len(), 2);
    assert_eq!(sel[0], sel[1], "InfLLM shares one selection across heads");
    for pages in &sel {
        assert!(
            pages.contains(&18) && pages.contains(&19),
            "planted block missing: {pages:?}"
        );
        assert!(pages.contains(&0), "sink kept: {pages:?}");
        assert!(pages.contains(&62), "window kept: {pages:?}");
        // sink 1 page + 2 blocks of 2 pages + window/pending pages (64 + up to 32 tokens).
        assert!(pages.len() <= 1 + 4 + 7, "too many pages: {pages:?}");
    }
}

#[test]
fn shadowkv_finds_the_planted_chunk() {
    let c = cfg(4, 2, 32, 8);
    let sk = ShadowKv::new(ShadowKvConfig {
        chunk_tokens: 8,
        rank: 32,
        sparse_budget_tokens: 32,
        outlier_chunks: 2,
        window_tokens: 32,
    })
    .unwrap();
    // Chunk 50 = tokens 400..408.
    let sel = planted_selection(&c, Box::new(sk), 800, 400..408);
    assert_eq!(sel.len(), 2, "one selection per KV head");
    for pages in &sel {
        assert!(pages.contains(&50), "planted chunk missing: {pages:?}");
        // 4 rebuilt chunks + 2 outliers + window (4 pages) + the decode page.
        assert!(pages.len() <= 4 + 2 + 5 + 1, "too many pages: {pages:?}");
    }
}

/// Running a step, aborting it after one layer and running it again gives the same
/// outputs as never aborting (the algorithms roll their per-sequence metadata back).
fn abort_is_transparent(make: &dyn Fn() -> Box<dyn SparseAlgorithm>, c: &CacheConfig) {
    let (hq, hkv, d) = (c.num_q_heads, c.num_kv_heads, c.head_dim);
    let run = |abort: bool| -> Vec<Tensor> {
        let mut cache = SpinCache::new_boxed(c.clone(), make()).unwrap();
        let mut r = rng(21);
        let seq = cache.add_sequence().unwrap();
        let mut outs = Vec::new();
        for (i, n) in [200usize, 1, 1, 1, 1].into_iter().enumerate() {
            let inputs: Vec<[Tensor; 3]> = (0..c.num_layers)
                .map(|_| {
                    [
                        randn(&mut r, &[n, hq, d], 1.0),
                        randn(&mut r, &[n, hkv, d], 1.0),
                        randn(&mut r, &[n, hkv, d], 1.0),
                    ]
                })
                .collect();
            if abort && i == 2 {
                cache.begin_step(&[StepInput { seq, new_tokens: n }]).unwrap();
                let [q, k, v] = &inputs[0];
                cache.attend(0, q, k, v).unwrap();
                cache.abort_step().unwrap();
                cache.verify_accounting().unwrap();
            }
            cache.begin_step(&[StepInput { seq, new_tokens: n }]).unwrap();
            for (layer, [q, k, v]) in inputs.iter().enumerate() {
                let o = cache.attend(layer, q, k, v).unwrap();
                if layer + 1 == c.num_layers {
                    outs.push(o);
                }
            }
            cache.end_step().unwrap();
        }
        outs
    };
    let (a, b) = (run(false), run(true));
    for (x, y) in a.iter().zip(&b) {
        assert!(max_abs_diff(x, y) < 1e-6);
    }
}

#[test]
fn aborted_steps_roll_metadata_back() {
    let c = cfg(6, 2, 64, 16);
    abort_is_transparent(
        &|| {
            Box::new(
                InfLlm::new(InfLlmConfig {
                    block_tokens: 32,
                    sink_tokens: 16,
                    window_tokens: 64,
                    topk_blocks: 2,
                    repr_topk: 4,
                })
                .unwrap(),
            )
        },
        &c,
    );
    let c = cfg(4, 2, 32, 8);
    abort_is_transparent(
        &|| {
            Box::new(
                ShadowKv::new(ShadowKvConfig {
                    rank: 16,
                    sparse_budget_tokens: 64,
                    outlier_chunks: 2,
                    ..Default::default()
                })
                .unwrap(),
            )
        },
        &c,
    );
}

#[test]
fn bad_configurations_are_construction_errors() {
    let err = |r: spinkv::Result<SpinCache>| r.err().map(|e| e.to_string()).unwrap_or_default();
    // InfLLM: block not a multiple of the page size.
    let inf = InfLlm::new(InfLlmConfig {
        block_tokens: 24,
        ..Default::default()
    })
    .unwrap();
    let e = err(SpinCache::new(cfg(6, 2, 64, 16), inf));
    assert!(
        e.contains("infllm") && e.contains("block_tokens (24)") && e.contains("page size (16)"),
        "{e}"
    );
    // InfLLM: repr_topk larger than a block; a budget smaller than sink + window + a block.
    let e = InfLlm::new(InfLlmConfig {
        repr_topk: 200,
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("repr_topk (200)"), "{e}");
    let e = by_name("infllm", 40).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("infllm") && e.contains("sink"), "{e}");
    // ShadowKV: rank above Hkv·D, page size other than the chunk, budget under outliers + window.
    let sk = ShadowKv::new(ShadowKvConfig {
        rank: 65,
        ..Default::default()
    })
    .unwrap();
    let e = err(SpinCache::new(cfg(4, 2, 32, 8), sk));
    assert!(
        e.contains("shadowkv") && e.contains("rank (65)") && e.contains("64"),
        "{e}"
    );
    let sk = ShadowKv::new(ShadowKvConfig::default()).unwrap();
    let e = err(SpinCache::new(cfg(4, 2, 32, 16), sk));
    assert!(e.contains("chunk_tokens (8)") && e.contains("page size (16)"), "{e}");
    let e = by_name("shadowkv", 40).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("shadowkv") && e.contains("window"), "{e}");
    // by_name builds both with a sensible budget.
    assert!(by_name("infllm", 256).unwrap().name().starts_with("infllm"));
    assert_eq!(by_name("shadowkv", 256).unwrap().page_size_hint(), Some(8));
}

/// An `index` call that fails part-way leaves the sequence's state as it was: the same
/// tokens indexed again afterwards succeed and give the state a clean run gives.
#[test]
fn index_errors_keep_the_state() {
    use spinkv::partition::{IndexInput, TokenRun};
    let c = cfg(6, 2, 64, 16);
    let (hq, hkv, d) = (c.num_q_heads, c.num_kv_heads, c.head_dim);
    let infllm = || -> Box<dyn SparseAlgorithm> {
        Box::new(
            InfLlm::new(InfLlmConfig {
                block_tokens: 32,
                sink_tokens: 16,
                window_tokens: 64,
                topk_blocks: 2,
                repr_topk: 4,
            })
            .unwrap(),
        )
    };
    let cs = cfg(6, 2, 64, 8);
    let shadow = || -> Box<dyn SparseAlgorithm> {
        Box::new(
            ShadowKv::new(ShadowKvConfig {
                rank: 16,
                sparse_budget_tokens: 64,
                outlier_chunks: 2,
                ..Default::default()
            })
            .unwrap(),
        )
    };
    for (c, make) in [(&c, &infllm as &dyn Fn() -> Box<dyn SparseAlgorithm>), (&cs, &shadow)] {
        let mut r = rng(5);
        let batches: Vec<[Tensor; 3]> = [300usize, 1, 1]
            .iter()
            .map(|&n| {
                [
                    randn(&mut r, &[n, hq, d], 1.0),
                    randn(&mut r, &[n, hkv, d], 1.0),
                    randn(&mut r, &[n, hkv, d], 1.0),
                ]
            })
            .collect();
        let index = |a: &mut dyn SparseAlgorithm, i: usize, q: &Tensor| -> spinkv::Result<()> {
            let start = [0, 300, 301][i];
            let [_, k, v] = &batches[i];
            let n = k.dims()[0];
            let dst = Tensor::zeros((n, hkv), DType::U32, &candle_core::Device::Cpu).unwrap();
            let runs = [TokenRun {
                seq: 7,
                start,
                n,
                row: 0,
                owner: 7,
            }];
            a.index(&IndexInput {
                layer: 0,
                runs: &runs,
                runs_table: &TokenRun::table(&runs, &candle_core::Device::Cpu).unwrap(),
                q,
                k,
                k_pre_rope: k,
                v,
                dst: &dst,
                minmax_updated: false,
            })
        };
        let (mut clean, mut failed) = (make(), make());
        clean.init(c).unwrap();
        failed.init(c).unwrap();
        for i in 0..3 {
            index(clean.as_mut(), i, &batches[i][0]).unwrap();
            if i > 0 {
                // Mismatched rows: k has one row, k_pre_rope is narrowed past its end (ShadowKV)
                // and q has none (InfLLM's window mass): both fail after their checks.
                let [_, k, v] = &batches[i];
                let empty = Tensor::zeros((0, hkv, d), DType::F32, &candle_core::Device::Cpu).unwrap();
                let q0 = Tensor::zeros((0, hq, d), DType::F32, &candle_core::Device::Cpu).unwrap();
                let dst = Tensor::zeros((1, hkv), DType::U32, &candle_core::Device::Cpu).unwrap();
                let runs = [TokenRun {
                    seq: 7,
                    start: [0, 300, 301][i],
                    n: 1,
                    row: 0,
                    owner: 7,
                }];
                let r = failed.index(&IndexInput {
                    layer: 0,
                    runs: &runs,
                    runs_table: &TokenRun::table(&runs, &candle_core::Device::Cpu).unwrap(),
                    q: &q0,
                    k,
                    k_pre_rope: &empty,
                    v,
                    dst: &dst,
                    minmax_updated: false,
                });
                assert!(r.is_err(), "{}: a bad index call must fail", clean.name());
            }
            index(failed.as_mut(), i, &batches[i][0])
                .unwrap_or_else(|e| panic!("{}: index after an error: {e}", clean.name()));
        }
        // Both select the same pages for a decode query.
        let q = randn(&mut r, &[1, hq, d], 1.0);
        let np = 302usize.div_ceil(c.page_size);
        let cand: Vec<u32> = (0..hkv).flat_map(|_| 0..np as u32).collect();
        let cand = Tensor::from_vec(cand, (1, hkv, np), &candle_core::Device::Cpu).unwrap();
        let rows = Tensor::from_vec(vec![7u32, 301, 1, 0], (1, 4), &candle_core::Device::Cpu).unwrap();
        let sel = |a: &mut dyn SparseAlgorithm| match a
            .select(&spinkv::partition::SelectInput {
                layer: 0,
                seqs: &[7],
                q: &q,
                rows: &rows,
                candidates: &cand,
                num_pages: &[np],
                num_tokens: &[302],
                page_size: c.page_size,
                to_host: true,
            })
            .unwrap()
        {
            spinkv::partition::Selection::Pages(p) => p.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
            spinkv::partition::Selection::All => vec![],
        };
        assert_eq!(sel(clean.as_mut()), sel(failed.as_mut()), "{}", clean.name());
    }
}

/// `ops::infllm_restore` rolls an owner's masses back only when its latest ring write is
/// the one that started at the given position (what a step whose device work never ran —
/// a failed graph capture — must leave alone), and only once.
#[test]
fn infllm_restore_rolls_back_only_the_write_it_names() {
    use spinkv::ops::{infllm_restore, infllm_ring_write, NONE};
    use spinkv::partition::TokenRun;
    let dev = candle_core::Device::Cpu;
    let (s, w, h, d) = (2usize, 6usize, 2usize, 4usize);
    let ring_k = Tensor::zeros((s, w, h, d), DType::F32, &dev).unwrap();
    // Masses 1.0 everywhere, then a write at position 9 for owner 1.
    let ones = vec![1f32.to_bits(); s * 4 * w * h];
    let ring_m = Tensor::from_vec(ones, (s, 4, w, h), &dev).unwrap();
    let k = Tensor::zeros((1, h, d), DType::F32, &dev).unwrap();
    let dst = Tensor::from_vec(vec![NONE; h], (1, h), &dev).unwrap();
    let run = [TokenRun {
        seq: 5,
        start: 9,
        n: 1,
        row: 0,
        owner: 1,
    }];
    infllm_ring_write(&ring_k, &ring_m, &k, &dst, &TokenRun::table(&run, &dev).unwrap(), 4).unwrap();
    let plane = w * h;
    let mass = |m: &Tensor| -> Vec<u32> { u32s(m)[4 * plane + plane..4 * plane + 2 * plane].to_vec() };
    let written = mass(&ring_m);
    assert_eq!(
        written.iter().filter(|&&x| x == 0).count(),
        h,
        "the new token's mass is zeroed"
    );
    // Another position: nothing changes.
    infllm_restore(&ring_m, 1, 8).unwrap();
    assert_eq!(mass(&ring_m), written);
    // The write's own position: the masses before it come back, once.
    infllm_restore(&ring_m, 1, 9).unwrap();
    assert!(mass(&ring_m).iter().all(|&x| x == 1f32.to_bits()));
    assert_eq!(u32s(&ring_m)[4 * plane + 3 * plane], NONE, "the flag is cleared");
    // Owner 0 was never written: untouched by either call.
    assert!(u32s(&ring_m)[..plane * 3].iter().all(|&x| x == 1f32.to_bits()));
    let e = infllm_restore(&ring_m, 2, 9).unwrap_err().to_string();
    assert!(e.contains("infllm_restore") && e.contains("owner 2"), "{e}");
}
