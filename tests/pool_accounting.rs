//! Pool accounting under random add / reserve / append / abort / remove sequences, in
//! both page layouts: no page leaked, no slot owned twice, everything freed when all sequences are
//! removed; a full pool is back-pressure that leaves the cache unchanged.

#![allow(
    clippy::needless_range_loop,
    clippy::explicit_counter_loop,
    clippy::too_many_arguments
)]

mod common;

use common::*;
use rand::Rng;
use spinkv::partition::{Dense, Quest, QuestConfig};
use spinkv::{CacheConfig, Error, PageLayout, SeqId, SparseKvCache, SpinCache, StepInput, Tier};

fn attend_all(cache: &mut SpinCache, t: usize, r: &mut rand::rngs::StdRng) {
    let c = cache.config().clone();
    for layer in 0..c.num_layers {
        let q = randn(r, &[t, c.num_q_heads, c.head_dim], 1.0);
        let k = randn(r, &[t, c.num_kv_heads, c.head_dim], 1.0);
        let v = randn(r, &[t, c.num_kv_heads, c.head_dim], 1.0);
        cache.attend(layer, &q, &k, &v).unwrap();
    }
}

#[test]
fn random_workloads_never_leak_or_double_own() {
    for seed in 0..8u64 {
        let mut r = rng(100 + seed);
        let mut cfg = CacheConfig::new(2, 2, 1, 16).with_token_capacity(600, 0.2);
        cfg.page_size = 8;
        let mut cfg = cfg.with_token_capacity(600, 0.2);
        // Seeds 2, 3, 6, 7 place pages by directory.
        if seed / 2 % 2 == 1 {
            cfg.page_layout = PageLayout::ByDirectory;
        }
        let mut cache = if seed % 2 == 0 {
            SpinCache::new(cfg, Dense::new()).unwrap()
        } else {
            SpinCache::new(
                cfg,
                Quest::new(QuestConfig {
                    budget_tokens: 48,
                    sink_tokens: 8,
                    window_tokens: 8,
                    dense_layers: 0,
                    shared_across_heads: false,
                    ..Default::default()
                }),
            )
            .unwrap()
        };
        let mut live: Vec<SeqId> = Vec::new();
        let mut exhausted = 0;
        for _ in 0..300 {
            match r.random_range(0..10) {
                0..=1 => live.push(cache.add_sequence().unwrap()),
                2 if !live.is_empty() => {
                    let i = r.random_range(0..live.len());
                    cache.remove_sequence(live.swap_remove(i)).unwrap();
                }
                // Pages held ahead of the length (sometimes more than the pool has left).
                3 if !live.is_empty() && r.random_bool(0.5) => {
                    let seq = live[r.random_range(0..live.len())];
                    let tokens = cache.sequence_len(seq).unwrap() + r.random_range(1..120);
                    let before = cache.pool_usage();
                    match cache.reserve(seq, tokens) {
                        Ok(()) => {}
                        Err(Error::PoolExhausted { tier: Tier::Host, .. }) => {
                            exhausted += 1;
                            assert_eq!(cache.pool_usage(), before, "back-pressure must change nothing");
                        }
                        Err(Error::Invalid { .. }) => {} // over max_seq_len
                        Err(e) => panic!("unexpected error {e}"),
                    }
                }
                _ if !live.is_empty() => {
                    let mut inputs: Vec<StepInput> = Vec::new();
                    for &seq in &live {
                        if r.random_bool(0.6) {
                            let new_tokens = if r.random_bool(0.3) { r.random_range(2..60) } else { 1 };
                            inputs.push(StepInput { seq, new_tokens });
                        }
                    }
                    if inputs.is_empty() {
                        inputs.push(StepInput {
                            seq: live[0],
                            new_tokens: 1,
                        });
                    }
                    let before = cache.pool_usage();
                    let lens: Vec<usize> = live.iter().map(|&s| cache.sequence_len(s).unwrap()).collect();
                    match cache.begin_step(&inputs) {
                        Err(Error::PoolExhausted { tier: Tier::Host, .. }) => {
                            exhausted += 1;
                            assert_eq!(cache.pool_usage(), before, "back-pressure must change nothing");
                            let after: Vec<usize> = live.iter().map(|&s| cache.sequence_len(s).unwrap()).collect();
                            assert_eq!(lens, after);
                        }
                        Err(Error::Invalid { .. }) => {} // over max_seq_len
                        Err(e) => panic!("unexpected error {e}"),
                        Ok(()) => {
                            let t = inputs.iter().map(|i| i.new_tokens).sum();
                            if r.random_bool(0.1) {
                                cache.abort_step().unwrap();
                                assert_eq!(
                                    cache.pool_usage().host_used,
                                    before.host_used,
                                    "abort frees the step's pages"
                                );
                            } else {
                                attend_all(&mut cache, t, &mut r);
                                cache.end_step().unwrap();
                            }
                        }
                    }
                }
                _ => {}
            }
            cache.verify_accounting().unwrap();
        }
        assert!(
            exhausted > 0,
            "seed {seed}: the workload should hit back-pressure at least once"
        );
        for s in live.drain(..) {
            cache.remove_sequence(s).unwrap();
        }
        let u = cache.pool_usage();
        assert_eq!(u.host_used, 0, "all host slots freed");
        assert_eq!(u.fast_resident, 0, "no fast-tier page left");
        assert_eq!(u.page_table_bytes, 0, "no page-table leaf left");
        cache.verify_accounting().unwrap();
    }
}
