//! Tiering is real: with a fast tier holding 10% of the KV, outputs equal those of an
//! all-in-fast-tier cache, and the hit/miss/byte counters are consistent.

#![allow(
    clippy::needless_range_loop,
    clippy::explicit_counter_loop,
    clippy::too_many_arguments
)]

mod common;

use candle_core::Tensor;
use common::harness::random_step;
use common::*;
use spinkv::partition::{Dense, Quest, QuestConfig, SparseAlgorithm};
use spinkv::{CacheConfig, SparseKvCache, SpinCache, StepInput, StepStats};

fn run(algo: Box<dyn SparseAlgorithm>, fast_fraction: f64, seed: u64) -> (Vec<Tensor>, StepStats, usize) {
    let (layers, hq, hkv, d) = (2, 4, 2, 64);
    let mut r = rng(seed);
    let cfg = CacheConfig::new(layers, hq, hkv, d).with_token_capacity(3 * 700, fast_fraction);
    let page_bytes = cfg.page_bytes();
    let mut cache = SpinCache::new_boxed(cfg, algo).unwrap();
    let seqs: Vec<_> = (0..3).map(|_| cache.add_sequence().unwrap()).collect();
    let mut outs = Vec::new();
    let prompts = [400, 257, 513];
    for step in 0..40 {
        let inputs: Vec<StepInput> = seqs
            .iter()
            .zip(prompts)
            .map(|(&seq, p)| StepInput {
                seq,
                new_tokens: if step == 0 { p } else { 1 },
            })
            .collect();
        outs.extend(random_step(&mut cache, &inputs, &mut r).into_iter().map(|l| l.out));
        cache.verify_accounting().unwrap();
    }
    (outs, cache.stats(), page_bytes)
}

fn check(make: &dyn Fn() -> Box<dyn SparseAlgorithm>) {
    let (full, full_stats, _) = run(make(), 1.0, 3);
    let (small, stats, page_bytes) = run(make(), 0.10, 3);
    for (a, b) in full.iter().zip(&small) {
        let err = max_abs_diff(a, b);
        assert!(err < 1e-5, "10% fast tier differs from full tier by {err}");
    }
    assert_eq!(
        stats.bytes_moved,
        (stats.misses + stats.spilled) * page_bytes as u64,
        "bytes = (misses + spilled) × page bytes"
    );
    assert_eq!(
        stats.hits + stats.misses + stats.spilled,
        full_stats.hits + full_stats.misses + full_stats.spilled,
        "same page requests in both runs"
    );
    assert!(
        stats.misses > full_stats.misses,
        "a small tier must miss more ({} vs {})",
        stats.misses,
        full_stats.misses
    );
    assert!(
        stats.spilled > full_stats.spilled,
        "a small tier spills pages its buckets cannot hold ({} vs {})",
        stats.spilled,
        full_stats.spilled
    );
    // A fast tier as large as the KV (Fibonacci-hashed buckets) fetches each page about once.
    let (host_pages, _) = (3 * 700usize.div_ceil(16) * 2 * 2, ());
    assert!(
        full_stats.misses as usize <= host_pages,
        "full tier fetched {} pages for {host_pages} slots",
        full_stats.misses
    );
}

#[test]
fn dense_with_ten_percent_fast_tier_equals_full_tier() {
    check(&|| Box::new(Dense::new()));
}

#[test]
fn quest_with_ten_percent_fast_tier_equals_full_tier() {
    check(&|| {
        Box::new(Quest::new(QuestConfig {
            budget_tokens: 128,
            dense_layers: 1,
            ..Default::default()
        }))
    });
}
