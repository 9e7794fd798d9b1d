//! The trace-driven simulator: it replays a cache's recorded selections with the cache's
//! own policy code and reproduces the cache's hit and miss counts exactly; its counts
//! are conserved; the exact LRU's misses are compulsory when everything fits; and on a
//! mixed workload (reusing + scanning requests) at 5% capacity dynamic budgets beat fixed
//! equal budgets and no budgets (a regression guard for the policy).

mod common;

use common::*;
use spinkv::partition::{Quest, QuestConfig};
use spinkv::pool::BudgetPolicy;
use spinkv::sim::{self, synthetic, CachePolicy};
use spinkv::{CacheConfig, SparseKvCache, SpinCache, StepInput};
use std::collections::HashSet;

#[test]
fn replaying_a_recorded_trace_reproduces_the_cache_counts() {
    let mut cfg = CacheConfig::new(2, 4, 2, 32);
    cfg.page_size = 32;
    let cfg = cfg.with_token_capacity(1024, 0.2);
    let (ways, fast) = (cfg.lru_ways, cfg.fast_pages);
    let policy = cfg.budget_policy;
    let quest = Quest::new(QuestConfig {
        budget_tokens: 128,
        sink_tokens: 32,
        window_tokens: 32,
        dense_layers: 0,
        shared_across_heads: false,
        ..Default::default()
    });
    let mut cache = SpinCache::new(cfg, quest).unwrap();
    let mut r = rng(3);
    let a = cache.add_sequence().unwrap();
    let b = cache.add_sequence().unwrap();
    let mut step = |cache: &mut SpinCache, inputs: &[StepInput]| {
        let t: usize = inputs.iter().map(|i| i.new_tokens).sum();
        cache.begin_step(inputs).unwrap();
        for layer in 0..2 {
            let q = randn(&mut r, &[t, 4, 32], 1.0);
            let k = randn(&mut r, &[t, 2, 32], 1.0);
            let v = randn(&mut r, &[t, 2, 32], 1.0);
            cache.attend(layer, &q, &k, &v).unwrap();
        }
        cache.end_step().unwrap()
    };
    // Prefills of 300 and 200 tokens (pages of 32: no decode step below opens a page).
    step(
        &mut cache,
        &[StepInput {
            seq: a,
            new_tokens: 300,
        }],
    );
    step(
        &mut cache,
        &[StepInput {
            seq: b,
            new_tokens: 200,
        }],
    );
    cache.set_trace(true);
    let mut hits = 0;
    let mut misses = 0;
    for _ in 0..19 {
        let s = step(
            &mut cache,
            &[StepInput { seq: a, new_tokens: 1 }, StepInput { seq: b, new_tokens: 1 }],
        );
        hits += s.hits;
        misses += s.misses + s.spilled;
    }
    assert!(
        misses > 0 && hits > 0,
        "a 20% fast tier both hits and misses ({hits}/{misses})"
    );
    let reqs = sim::requests_from_records("cache", &cache.take_trace());
    assert_eq!(reqs.len(), 2);
    let rep = sim::simulate(&reqs, fast, CachePolicy::Bucketed { ways, budgets: policy });
    assert_eq!(
        (rep.hits, rep.misses),
        (hits, misses),
        "the simulator runs the cache's policy code on the same page ids"
    );
}

#[test]
fn counts_are_conserved_and_exact_lru_misses_are_compulsory() {
    let reqs = synthetic::uniform_workload(4, 0.1, 1);
    let refs: u64 = reqs
        .iter()
        .flat_map(|r| r.steps.iter().flatten().flat_map(|l| l.heads.iter()))
        .map(|h| h.len() as u64)
        .sum();
    let mut distinct = HashSet::new();
    for (ri, r) in reqs.iter().enumerate() {
        for ls in r.steps.iter().flatten() {
            for (h, pages) in ls.heads.iter().enumerate() {
                for &p in pages {
                    distinct.insert((ri, ls.layer, h, p));
                }
            }
        }
    }
    let kv = sim::total_kv_pages(&reqs);
    for policy in [
        CachePolicy::ExactLru,
        CachePolicy::Bucketed {
            ways: 8,
            budgets: BudgetPolicy::DYNAMIC,
        },
        CachePolicy::Bucketed {
            ways: 8,
            budgets: BudgetPolicy::FixedEqual,
        },
    ] {
        for cap in [kv / 20, kv / 4, kv] {
            let rep = sim::simulate(&reqs, cap, policy);
            assert_eq!(rep.hits + rep.misses, refs, "{policy:?} at {cap}");
            assert!(
                rep.misses >= distinct.len() as u64,
                "{policy:?}: at least the compulsory misses"
            );
        }
    }
    let all = sim::simulate(&reqs, kv, CachePolicy::ExactLru);
    assert_eq!(
        all.misses,
        distinct.len() as u64,
        "everything fits: only compulsory misses"
    );
}

#[test]
fn dynamic_budgets_win_on_a_mixed_workload() {
    let reqs = synthetic::mixed_workload(8, 7);
    let cap = sim::total_kv_pages(&reqs) / 20;
    let rate = |budgets| sim::simulate(&reqs, cap, CachePolicy::Bucketed { ways: 8, budgets }).hit_rate();
    let (dynamic, fixed, none) = (
        rate(BudgetPolicy::DYNAMIC),
        rate(BudgetPolicy::FixedEqual),
        rate(BudgetPolicy::Unlimited),
    );
    assert!(
        dynamic > fixed + 0.05 && dynamic > none + 0.05,
        "dynamic {dynamic:.3}, fixed {fixed:.3}, none {none:.3}"
    );
}
