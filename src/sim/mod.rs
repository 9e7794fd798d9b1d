//! Trace-driven simulation of the fast tier: replays per-request selection traces (real
//! ones recorded with [`SpinCache::set_trace`](crate::SpinCache::set_trace), or synthetic
//! ones) against the bucketed LRU with or without per-request budgets — the same
//! [`BucketedLru`] and [`BudgetTracker`] code the cache runs — and against an exact
//! (fully associative) LRU of the same capacity, and reports hit rates.
//!
//! Replay model (as in the cache): all requests decode together; a step visits the layers
//! in order, and each layer is one round in which the pages of every request's every KV
//! head are resolved and pinned; pages that find their bucket fully pinned are *spilled*
//! (read from the host tier without being cached: misses that insert nothing). Page ids follow the host allocator's layout: request `r`'s page `p` of
//! direction `d` (= layer·Hkv + head) is `base_r + p·dirs + d`.

mod exact_lru;
pub mod predict;
pub mod synthetic;

pub use exact_lru::ExactLru;
pub use predict::{predictors, PredictorCounts, PredictorReport};

use crate::cache::SelectionRecord;
use crate::pool::{BucketedLru, BudgetPolicy, BudgetTracker, Resolve};
use std::collections::BTreeMap;

/// One layer's selection for one request in one step: `heads[h]` = logical pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSelection {
    /// Layer.
    pub layer: u32,
    /// Selected logical pages per KV head.
    pub heads: Vec<Vec<u32>>,
}

/// One request's decode selections, step by step.
#[derive(Debug, Clone)]
pub struct RequestTrace {
    /// Label (file and sequence, or the synthetic kind).
    pub name: String,
    /// `dirs` = layers · KV heads.
    pub dirs: u32,
    /// KV heads per layer.
    pub kv_heads: u32,
    /// `steps[t]` = the layers' selections of step `t`, in layer order.
    pub steps: Vec<Vec<LayerSelection>>,
}

impl RequestTrace {
    /// Largest logical page number + 1.
    pub fn max_pages(&self) -> u32 {
        self.steps
            .iter()
            .flatten()
            .flat_map(|l| l.heads.iter().flatten())
            .map(|&p| p + 1)
            .max()
            .unwrap_or(0)
    }

    /// Pages of KV this request holds at its end (all layers and heads).
    pub fn kv_pages(&self) -> usize {
        self.max_pages() as usize * self.dirs as usize
    }
}

/// Groups recorded selections into one [`RequestTrace`] per sequence (label
/// `"{name}#seq"`), ordered by step and layer.
pub fn requests_from_records(name: &str, records: &[SelectionRecord]) -> Vec<RequestTrace> {
    /// (KV head, pages) per layer, per step.
    type Steps = BTreeMap<u64, BTreeMap<u32, Vec<(u32, Vec<u32>)>>>;
    let mut by_seq: BTreeMap<u64, Steps> = BTreeMap::new();
    let mut heads = 1;
    let mut layers = 1;
    for r in records {
        heads = heads.max(r.kv_head + 1);
        layers = layers.max(r.layer + 1);
        by_seq
            .entry(r.seq)
            .or_default()
            .entry(r.step)
            .or_default()
            .entry(r.layer)
            .or_default()
            .push((r.kv_head, r.pages.clone()));
    }
    by_seq
        .into_iter()
        .map(|(seq, steps)| RequestTrace {
            name: format!("{name}#{seq}"),
            dirs: layers * heads,
            kv_heads: heads,
            steps: steps
                .into_values()
                .map(|ls| {
                    ls.into_iter()
                        .map(|(layer, mut hs)| {
                            hs.sort_by_key(|h| h.0);
                            let mut v = vec![Vec::new(); heads as usize];
                            for (h, p) in hs {
                                v[h as usize] = p;
                            }
                            LayerSelection { layer, heads: v }
                        })
                        .collect()
                })
                .collect(),
        })
        .collect()
}

/// The fast-tier policy to simulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachePolicy {
    /// The bucketed LRU with `ways` per bucket and the given budget policy.
    Bucketed {
        /// Ways per bucket.
        ways: usize,
        /// Per-request budgets.
        budgets: BudgetPolicy,
    },
    /// A fully associative LRU (no buckets, no budgets).
    ExactLru,
}

/// Hit and miss counts of one replay.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimReport {
    /// Page requests served from the fast tier.
    pub hits: u64,
    /// Page requests read from the host tier (spilled ones included).
    pub misses: u64,
    /// Of the misses, requests spilled because their bucket was fully pinned.
    pub spilled: u64,
    /// Steps replayed.
    pub steps: u64,
    /// Per request: (name, hits, misses).
    pub per_request: Vec<(String, u64, u64)>,
}

impl SimReport {
    /// hits / (hits + misses).
    pub fn hit_rate(&self) -> f64 {
        let t = self.hits + self.misses;
        if t == 0 {
            1.0
        } else {
            self.hits as f64 / t as f64
        }
    }
}

/// Total KV pages of `requests` (the sum of [`RequestTrace::kv_pages`]).
pub fn total_kv_pages(requests: &[RequestTrace]) -> usize {
    requests.iter().map(RequestTrace::kv_pages).sum()
}

enum Cache {
    Bucketed(Box<(BucketedLru, BudgetTracker)>),
    Exact(ExactLru),
}

/// Replays `requests` (all starting at step 0) against a fast tier of `capacity` page
/// slots (rounded down to whole buckets, at least one).
pub fn simulate(requests: &[RequestTrace], capacity: usize, policy: CachePolicy) -> SimReport {
    let mut cache = match policy {
        CachePolicy::Bucketed { ways, budgets } => {
            let buckets = (capacity / ways.max(1)).max(1);
            Cache::Bucketed(Box::new((
                BucketedLru::new(buckets, ways.max(1)),
                BudgetTracker::new(budgets, buckets * ways.max(1)),
            )))
        }
        CachePolicy::ExactLru => Cache::Exact(ExactLru::new(capacity.max(1))),
    };
    let mut bases = Vec::with_capacity(requests.len());
    let mut next = 0u64;
    for r in requests {
        bases.push(next);
        next += r.max_pages() as u64 * r.dirs as u64;
    }
    let mut rep = SimReport {
        per_request: requests.iter().map(|r| (r.name.clone(), 0, 0)).collect(),
        ..Default::default()
    };
    let steps = requests.iter().map(|r| r.steps.len()).max().unwrap_or(0);
    let max_layers = requests
        .iter()
        .flat_map(|r| r.steps.iter().flatten().map(|l| l.layer + 1))
        .max()
        .unwrap_or(0);
    for t in 0..steps {
        for layer in 0..max_layers {
            // (request, page id) of this round.
            let mut pending: Vec<(usize, u32)> = Vec::new();
            for (ri, r) in requests.iter().enumerate() {
                let Some(step) = r.steps.get(t) else { continue };
                for ls in step.iter().filter(|l| l.layer == layer) {
                    for (h, pages) in ls.heads.iter().enumerate() {
                        let dir = layer as u64 * r.kv_heads as u64 + h as u64;
                        for &p in pages {
                            pending.push((ri, (bases[ri] + p as u64 * r.dirs as u64 + dir) as u32));
                        }
                    }
                }
            }
            match &mut cache {
                Cache::Bucketed(b) => b.0.begin_round(),
                Cache::Exact(e) => e.begin_round(),
            }
            for &(ri, id) in &pending {
                let res = match &mut cache {
                    Cache::Bucketed(b) => {
                        let (lru, tracker) = &mut **b;
                        lru.resolve_for(id, ri as u64, tracker)
                    }
                    Cache::Exact(e) => e.resolve(id),
                };
                match res {
                    Resolve::Hit(_) => {
                        rep.hits += 1;
                        rep.per_request[ri].1 += 1;
                    }
                    Resolve::Miss { .. } | Resolve::Deferred => {
                        rep.misses += 1;
                        rep.spilled += u64::from(res == Resolve::Deferred);
                        rep.per_request[ri].2 += 1;
                    }
                }
            }
        }
        if let Cache::Bucketed(b) = &mut cache {
            let tracker = &mut b.1;
            for (ri, r) in requests.iter().enumerate() {
                match r.steps.get(t) {
                    Some(step) => {
                        let base = bases[ri];
                        let ids = step.iter().flat_map(|ls| {
                            ls.heads.iter().enumerate().flat_map(move |(h, pages)| {
                                let dir = ls.layer as u64 * r.kv_heads as u64 + h as u64;
                                pages
                                    .iter()
                                    .map(move |&p| (base + p as u64 * r.dirs as u64 + dir) as u32)
                            })
                        });
                        tracker.observe(ri as u64, ids);
                    }
                    None => tracker.remove(ri as u64),
                }
            }
            tracker.end_step();
        }
        rep.steps += 1;
    }
    rep
}
