//! Quest on planted inputs: keys aligned (after RoPE) with the decode query are planted
//! in a few pages; with a small budget Quest must select those pages, and its output must
//! stay within 1e-2 relative of Dense.

#![allow(
    clippy::needless_range_loop,
    clippy::explicit_counter_loop,
    clippy::too_many_arguments
)]

mod common;

use candle_core::Tensor;
use common::*;
use spinkv::partition::{Dense, Quest, QuestConfig, SparseAlgorithm};
use spinkv::{CacheConfig, SparseKvCache, SpinCache, StepInput};

const THETA: f64 = 10_000.0;

/// Builds a context of `ctx` tokens whose keys at `planted` positions align with `q`
/// after RoPE, then one decode step; returns (output, trace pages of head 0 of layer 1).
fn run(algo: Box<dyn SparseAlgorithm>, seed: u64, planted: &[usize]) -> (Tensor, Vec<Vec<u32>>) {
    let (hq, hkv, d, ctx) = (6, 2, 64, 1000);
    let mut r = rng(seed);
    let mut cfg = CacheConfig::new(2, hq, hkv, d);
    cfg.rope_theta = THETA;
    let mut cache = SpinCache::new_boxed(cfg, algo).unwrap();
    cache.set_trace(true);
    let seq = cache.add_sequence().unwrap();
    // The decode query (pre-RoPE) at position ctx, the same for every head.
    let q1 = randn(&mut r, &[1, 1, d], 1.0);
    let q = q1.broadcast_as((1, hq, d)).unwrap().contiguous().unwrap();
    let mut outs = None;
    for layer_inputs in 0..2 {
        let _ = layer_inputs;
    }
    // Prefill: random keys with planted rows k = 3 · R(ctx − p) q, so R(p) k = 3 · R(ctx) q.
    let mut k = randn(&mut r, &[ctx, hkv, d], 1.0)
        .to_dtype(candle_core::DType::F64)
        .unwrap();
    for &p in planted {
        let aligned = rope_f64(&q1, &[(ctx - p) as f64], THETA).affine(3.0, 0.0).unwrap();
        let row = aligned.broadcast_as((1, hkv, d)).unwrap().contiguous().unwrap();
        k = k.slice_assign(&[p..p + 1, 0..hkv, 0..d], &row).unwrap();
    }
    let k = k.to_dtype(candle_core::DType::F32).unwrap();
    let v = randn(&mut r, &[ctx, hkv, d], 1.0);
    let qp = randn(&mut r, &[ctx, hq, d], 1.0);
    cache.begin_step(&[StepInput { seq, new_tokens: ctx }]).unwrap();
    for layer in 0..2 {
        cache.attend(layer, &qp, &k, &v).unwrap();
    }
    cache.end_step().unwrap();
    cache.begin_step(&[StepInput { seq, new_tokens: 1 }]).unwrap();
    let kn = randn(&mut r, &[1, hkv, d], 1.0);
    let vn = randn(&mut r, &[1, hkv, d], 1.0);
    for layer in 0..2 {
        let o = cache.attend(layer, &q, &kn, &vn).unwrap();
        if layer == 1 {
            outs = Some(o);
        }
    }
    cache.end_step().unwrap();
    let trace = cache.take_trace();
    let pages = trace.iter().filter(|t| t.layer == 1).map(|t| t.pages.clone()).collect();
    (outs.unwrap(), pages)
}

#[test]
fn quest_selects_planted_pages_and_tracks_dense() {
    let planted = [100, 333, 334, 700];
    let quest = Quest::new(QuestConfig {
        budget_tokens: 128,
        sink_tokens: 16,
        window_tokens: 32,
        dense_layers: 1,
        shared_across_heads: false,
    });
    let (q_out, q_pages) = run(Box::new(quest), 5, &planted);
    let (d_out, d_pages) = run(Box::new(Dense::new()), 5, &planted);
    assert_eq!(q_pages.len(), 2, "one selection per KV head");
    for pages in &q_pages {
        assert_eq!(pages.len(), 8, "budget 128 tokens = 8 pages: {pages:?}");
        for p in planted {
            assert!(
                pages.contains(&((p / 16) as u32)),
                "planted page {} missing from {pages:?}",
                p / 16
            );
        }
        assert!(pages.contains(&0), "sink page kept: {pages:?}");
        assert!(
            pages.contains(&62) && pages.contains(&61),
            "window pages kept: {pages:?}"
        );
    }
    assert!(d_pages.iter().all(|p| p.len() == 63), "dense attends all 63 pages");
    let err = rel_err(&q_out, &d_out);
    assert!(err < 1e-2, "quest vs dense relative error {err}");
}

#[test]
fn quest_shared_selection_is_identical_across_heads() {
    let quest = Quest::new(QuestConfig {
        budget_tokens: 128,
        dense_layers: 0,
        shared_across_heads: true,
        ..Default::default()
    });
    let (_, pages) = run(Box::new(quest), 9, &[200, 500]);
    assert_eq!(pages[0], pages[1]);
    assert!(pages[0].contains(&(200 / 16)) && pages[0].contains(&(500 / 16)));
}
