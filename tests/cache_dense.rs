//! Dense through the cache equals plain causal attention over the concatenated K/V.

#![allow(
    clippy::needless_range_loop,
    clippy::explicit_counter_loop,
    clippy::too_many_arguments
)]

mod common;

use common::harness::{random_step, Reference};
use common::*;
use spinkv::ops::reference_attention;
use spinkv::partition::{Dense, Quest, QuestConfig, SparseAlgorithm};
use spinkv::{CacheConfig, FetchMode, SparseKvCache, SpinCache, StepInput};

const THETA: f64 = 10_000.0;

/// Runs `prompt` + `decode` steps on one sequence (2 layers) and returns the max abs
/// error against the f64 reference over every step and layer.
fn dense_vs_reference(
    algo: Box<dyn SparseAlgorithm>,
    hq: usize,
    hkv: usize,
    d: usize,
    page: usize,
    prompt: usize,
    decode: usize,
    seed: u64,
) -> f64 {
    let mut r = rng(seed);
    let mut cfg = CacheConfig::new(2, hq, hkv, d);
    cfg.page_size = page;
    cfg.rope_theta = THETA;
    let cfg = cfg.with_token_capacity(prompt + decode + page, 1.0);
    let mut cache = SpinCache::new_boxed(cfg, algo).unwrap();
    let seq = cache.add_sequence().unwrap();
    let mut reference = Reference::new(THETA, d);
    let mut worst = 0f64;
    for step in 0..=decode {
        let inputs = [StepInput {
            seq,
            new_tokens: if step == 0 { prompt } else { 1 },
        }];
        let io = random_step(&mut cache, &inputs, &mut r);
        worst = reference.check_step(&inputs, &io).into_iter().fold(worst, f64::max);
    }
    worst
}

#[test]
fn dense_matches_reference_across_gqa_head_dims_and_page_sizes() {
    let mut seed = 1;
    for &(hq, hkv) in &[(2, 2), (6, 2), (8, 2)] {
        for &d in &[64, 128] {
            for &page in &[8, 16, 32] {
                // Prompt lengths that are not multiples of the page size.
                let prompt = 3 * page + 5;
                let err = dense_vs_reference(Box::new(Dense::new()), hq, hkv, d, page, prompt, 50, seed);
                assert!(err < 1e-5, "dense GQA {hq}:{hkv} D={d} page={page}: max err {err}");
                seed += 1;
            }
        }
    }
}

#[test]
fn quest_with_budget_over_context_matches_reference() {
    let quest = Quest::new(QuestConfig {
        budget_tokens: 4096,
        dense_layers: 0,
        ..Default::default()
    });
    let err = dense_vs_reference(Box::new(quest), 6, 2, 64, 16, 77, 20, 99);
    assert!(err < 1e-5, "quest with full budget: max err {err}");
}

/// Two sequences in one ragged step: one prefilling, one decoding, plus a chunked
/// prefill (a multi-token step on a sequence that already has context).
#[test]
fn ragged_batch_and_chunked_prefill_match_reference() {
    let (hq, hkv, d) = (6, 2, 64);
    let mut r = rng(7);
    let mut cfg = CacheConfig::new(1, hq, hkv, d);
    cfg.rope_theta = THETA;
    let mut cache = SpinCache::new(cfg, Dense::new()).unwrap();
    let seqs = [cache.add_sequence().unwrap(), cache.add_sequence().unwrap()];
    let mut reference = Reference::new(THETA, d);
    let plan: &[[usize; 2]] = &[[37, 0], [1, 21], [1, 1], [19, 1], [1, 40], [1, 1]];
    for step in plan {
        let inputs: Vec<StepInput> = seqs
            .iter()
            .zip(step)
            .filter(|(_, &n)| n > 0)
            .map(|(&seq, &n)| StepInput { seq, new_tokens: n })
            .collect();
        let io = random_step(&mut cache, &inputs, &mut r);
        let err = reference.check_step(&inputs, &io)[0];
        assert!(err < 1e-5, "step {step:?}: err {err}");
    }
}

#[test]
fn half_precision_dtypes_run_and_stay_close() {
    for dtype in [candle_core::DType::F16, candle_core::DType::BF16] {
        let (hq, hkv, d) = (4, 2, 64);
        let mut r = rng(11);
        let mut cfg = CacheConfig::new(1, hq, hkv, d);
        cfg.dtype = dtype;
        let mut cache = SpinCache::new(cfg, Dense::new()).unwrap();
        let seq = cache.add_sequence().unwrap();
        let n = 40;
        cache.begin_step(&[StepInput { seq, new_tokens: n }]).unwrap();
        let q = randn(&mut r, &[n, hq, d], 1.0);
        let k = randn(&mut r, &[n, hkv, d], 1.0);
        let v = randn(&mut r, &[n, hkv, d], 1.0);
        let out = cache
            .attend(
                0,
                &q.to_dtype(dtype).unwrap(),
                &k.to_dtype(dtype).unwrap(),
                &v.to_dtype(dtype).unwrap(),
            )
            .unwrap();
        assert_eq!(out.dtype(), dtype);
        let pos: Vec<f64> = (0..n).map(|p| p as f64).collect();
        let want = reference_attention(
            &rope_f64(&q, &pos, THETA),
            &rope_f64(&k, &pos, THETA),
            &v,
            &(0..n).collect::<Vec<_>>(),
            0.125,
        )
        .unwrap();
        let err = rel_err(&out, &want);
        assert!(err < 2e-2, "{dtype:?}: relative error {err}");
        cache.end_step().unwrap();
    }
}

/// Every fetch mode on the CPU: `SideStream` finds no side stream and runs in order,
/// `InKernel` runs the composed reference of the fused attention (misses read from the
/// host tier and filled into their slots by the attention call). A cache with a small
/// fast tier (misses every step) matches the reference model in each.
#[test]
fn every_fetch_mode_matches_the_reference_on_the_cpu() {
    assert!(spinkv::ops::SideStream::new(&candle_core::Device::Cpu)
        .unwrap()
        .is_none());
    for (mode, runs) in [
        (FetchMode::InOrder, FetchMode::InOrder),
        (FetchMode::SideStream, FetchMode::InOrder),
        (FetchMode::InKernel, FetchMode::InKernel),
    ] {
        let mut cfg = CacheConfig::new(2, 4, 2, 32);
        cfg.fetch_mode = mode;
        let cfg = cfg.with_token_capacity(400, 0.1);
        let mut cache = SpinCache::new(cfg, Dense::new()).unwrap();
        assert_eq!(cache.fetch_mode(), runs, "{mode:?} on the CPU");
        let seq = cache.add_sequence().unwrap();
        let mut reference = Reference::new(THETA, 32);
        let mut r = rng(5);
        let mut worst = 0f64;
        for step in 0..6 {
            let inputs = [StepInput {
                seq,
                new_tokens: if step == 0 { 150 } else { 1 },
            }];
            let io = random_step(&mut cache, &inputs, &mut r);
            worst = reference.check_step(&inputs, &io).into_iter().fold(worst, f64::max);
        }
        assert!(worst < 1e-4, "{mode:?}: max err {worst}");
        assert!(cache.stats().misses > 0, "the fast tier of 10% missed");
    }
}
