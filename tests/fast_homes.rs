//! Pages whose home is the fast tier ([`CacheConfig::fast_home_pages`],
//! [`DeviceLru::with_fast_homes`]): capacity of HBM plus host.
//!
//! - The LRU: a request for an id with a fast home is a hit in its fixed slot and leaves
//!   the buckets alone. Random rounds mixing both kinds of ids give, for the host-homed
//!   ids, exactly what an LRU without homes gives for them alone (pairs, spills, misses,
//!   state, counters), and lookups and write-through destinations agree. With the `cuda`
//!   feature the same rounds on GPU 0 must match the CPU exactly.
//! - The cache: half the pages homed in HBM and a cache of 10% of the rest gives the
//!   outputs of an all-in-HBM cache (Dense, Quest with an aborted step whose page bounds
//!   are rebuilt from homed pages, ShadowKV whose values are gathered from both homes),
//!   while the host tier alone could not hold the sequences. The pool takes exactly
//!   `host_pages + fast_home_pages` pages, then answers `PoolExhausted`, and removing the
//!   sequences frees every page of both homes.

#![allow(clippy::needless_range_loop)]

mod common;

use candle_core::{Device, Tensor};
use common::harness::random_step;
use common::{max_abs_diff, rng, u32s};
use rand::Rng;
use spinkv::ops::NONE;
use spinkv::partition::{Dense, Quest, QuestConfig, ShadowKv, ShadowKvConfig, SparseAlgorithm};
use spinkv::tiered::{DeviceLru, ResolveRequest};
use spinkv::{CacheConfig, Error, SparseKvCache, SpinCache, StepInput, StepStats};

const OWNERS: usize = 4;
const HOST: usize = 160;
const HOMES: usize = 90;

/// One round's host view: fast pairs, spill pairs, sorted misses, the state snapshot.
type View = (Vec<u32>, Vec<u32>, Vec<(u32, u32)>, (Vec<u32>, Vec<u32>, Vec<i64>));

fn resolve(l: &mut DeviceLru, hs: &[u32], lp: &[u32], ow: &[u32], step: u32) -> View {
    let d = l.device().clone();
    let t = |v: &[u32]| Tensor::from_slice(v, v.len(), &d).unwrap();
    let (a, b, c) = (t(hs), t(lp), t(ow));
    let out = l
        .resolve(&ResolveRequest {
            host_slots: &a,
            logical: &b,
            owners: &c,
            step,
            reuse_steps: 2,
        })
        .unwrap();
    let count = u32s(&out.miss_count)[0] as usize;
    let mut misses: Vec<(u32, u32)> = u32s(&out.misses).chunks(2).take(count).map(|p| (p[0], p[1])).collect();
    misses.sort_unstable();
    (
        u32s(&out.fast_pairs),
        u32s(&out.spill_pairs),
        misses,
        l.snapshot().unwrap(),
    )
}

/// Random rounds on `with` (LRUs with fast homes, same geometry) and on `without` (the
/// same buckets, no homes) fed the host-homed requests only.
fn homes_schedule(seed: u64, with: &mut [DeviceLru], without: &mut DeviceLru) {
    let mut r = rng(seed);
    let homes = with[0].fast_homes();
    assert_eq!((homes.base as usize, homes.count as usize), (HOST, HOMES));
    let cap = with[0].capacity() as u32;
    assert_eq!(homes.fast_base, cap, "fast homes follow the buckets' slots");
    assert_eq!(with[0].fast_slots(), cap as usize + HOMES);
    for step in 1..=12u32 {
        let mut homed_requests = 0u64;
        for _round in 0..3 {
            let n = r.random_range(0..70);
            let hs: Vec<u32> = (0..n)
                .map(|_| {
                    if r.random_bool(0.1) {
                        NONE
                    } else {
                        r.random_range(0..(HOST + HOMES) as u32)
                    }
                })
                .collect();
            let lp: Vec<u32> = (0..n as u32).map(|i| 1000 + i).collect();
            // A page belongs to one sequence: the owner is a function of the id.
            let ow: Vec<u32> = hs
                .iter()
                .map(|&h| if h == NONE { 0 } else { h % OWNERS as u32 })
                .collect();
            let host_only: Vec<u32> = hs.iter().map(|&h| if (h as usize) < HOST { h } else { NONE }).collect();
            homed_requests += hs.iter().filter(|&&h| homes.slot(h).is_some()).count() as u64;
            let views: Vec<View> = with.iter_mut().map(|l| resolve(l, &hs, &lp, &ow, step)).collect();
            for v in &views[1..] {
                assert_eq!(v, &views[0], "seed {seed} step {step}: LRUs with homes differ");
            }
            let base = resolve(without, &host_only, &lp, &ow, step);
            let v = &views[0];
            for i in 0..n {
                let pair = &v.0[2 * i..2 * i + 2];
                match homes.slot(hs[i]) {
                    Some(f) => assert_eq!(pair, [f, lp[i]], "seed {seed}: homed id {} is a hit in its slot", hs[i]),
                    None => assert_eq!(pair, &base.0[2 * i..2 * i + 2], "seed {seed}: request {i}"),
                }
            }
            assert_eq!(
                (&v.1, &v.2, &v.3),
                (&base.1, &base.2, &base.3),
                "seed {seed} step {step}"
            );
        }
        // Lookups and write-through destinations of a random set of ids.
        let q: Vec<u32> = (0..50).map(|_| r.random_range(0..(HOST + HOMES) as u32)).collect();
        let rows: Vec<u32> = (0..50).map(|_| r.random_range(0..16)).collect();
        let qo: Vec<u32> = q.iter().map(|&h| if (h as usize) < HOST { h } else { NONE }).collect();
        let ld = |l: &DeviceLru, q: &[u32]| {
            let d = l.device().clone();
            let (qt, rt) = (
                Tensor::from_slice(q, 50, &d).unwrap(),
                Tensor::from_slice(&rows, 50, &d).unwrap(),
            );
            (
                u32s(&l.lookup(&qt).unwrap()),
                u32s(&l.fast_destinations(&qt, &rt, 16).unwrap()),
            )
        };
        let (bl, bd) = ld(without, &qo);
        for l in with.iter() {
            let (wl, wd) = ld(l, &q);
            for i in 0..50 {
                match homes.slot(q[i]) {
                    Some(f) => assert_eq!((wl[i], wd[i]), (f, f * 16 + rows[i])),
                    None => assert_eq!((wl[i], wd[i]), (bl[i], bd[i])),
                }
            }
        }
        // Freeing ids of both kinds: homed ones have nothing to forget.
        let freed: Vec<u32> = (0..6).map(|_| r.random_range(0..(HOST + HOMES) as u32)).collect();
        let freed_host: Vec<u32> = freed.iter().copied().filter(|&h| (h as usize) < HOST).collect();
        for l in with.iter_mut() {
            l.invalidate(&freed).unwrap();
        }
        without.invalidate(&freed_host).unwrap();
        let counters: Vec<_> = with.iter_mut().map(|l| l.take_step_counters().unwrap()).collect();
        let (reuse, base_counters) = without.take_step_counters().unwrap();
        for c in &counters {
            assert_eq!(c, &counters[0]);
        }
        assert_eq!(counters[0].0, reuse, "homed ids take no part in reuse tracking");
        assert_eq!(&counters[0].1[1..], &base_counters[1..], "misses and deferrals");
        assert_eq!(
            counters[0].1[0],
            base_counters[0] + homed_requests,
            "every homed request counts as one hit"
        );
        for l in with.iter() {
            assert_eq!(l.resident_counts().unwrap(), without.resident_counts().unwrap());
        }
    }
}

fn lru_with_homes(device: &Device) -> DeviceLru {
    DeviceLru::new(5, 3, OWNERS, HOST, device)
        .unwrap()
        .with_fast_homes(HOMES)
        .unwrap()
}

#[test]
fn lru_fast_homes_are_hits_and_leave_the_buckets_alone() {
    for seed in 0..8 {
        let mut with = [lru_with_homes(&Device::Cpu)];
        let mut without = DeviceLru::new(5, 3, OWNERS, HOST, &Device::Cpu).unwrap();
        homes_schedule(seed, &mut with, &mut without);
    }
}

#[test]
fn lru_fast_homes_reject_what_they_cannot_hold() {
    let d = Device::Cpu;
    assert!(DeviceLru::direct(2, 8, &d).unwrap().with_fast_homes(4).is_err());
    assert!(DeviceLru::new(2, 2, 2, 8, &d)
        .unwrap()
        .with_fast_homes(u32::MAX as usize)
        .is_err());
    let mut l = DeviceLru::new(2, 2, 2, 8, &d).unwrap().with_fast_homes(4).unwrap();
    assert_eq!(
        l.fixed_slot(9),
        Some(5),
        "id 9 is the second fast home, after 4 bucketed slots"
    );
    assert_eq!((l.fixed_slot(3), l.fixed_slot(12)), (None, None));
    let t = |v: &[u32]| Tensor::from_slice(v, v.len(), &d).unwrap();
    let (bad, lp, ow) = (t(&[11, 12]), t(&[0, 1]), t(&[0, 0]));
    let err = l
        .resolve(&ResolveRequest {
            host_slots: &bad,
            logical: &lp,
            owners: &ow,
            step: 1,
            reuse_steps: 0,
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("DeviceLru::resolve") && err.contains("12"), "{err}");
    assert!(l.invalidate(&[11, 12]).is_err());
    l.invalidate(&[11, 3, NONE]).unwrap();
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_lru_fast_homes_match_the_cpu() {
    let Some(gpu) = common::cuda_or_skip("cuda_lru_fast_homes_match_the_cpu") else {
        return;
    };
    spinkv::ops::set_poison_outputs(true);
    for seed in 0..8 {
        let mut with = [lru_with_homes(&Device::Cpu), lru_with_homes(&gpu)];
        let mut without = DeviceLru::new(5, 3, OWNERS, HOST, &Device::Cpu).unwrap();
        homes_schedule(100 + seed, &mut with, &mut without);
    }
}

const LAYERS: usize = 2;
const PROMPTS: [usize; 3] = [400, 257, 513];
const STEPS: usize = 30;

/// A cache config holding the three sequences: all in HBM (`homes = None`), or with
/// `homes` of the pages homed in HBM and a 10% cache of the rest.
fn config(homes: Option<f64>, device: &Device) -> CacheConfig {
    let mut c = CacheConfig::new(LAYERS, 4, 2, 64);
    c.device = device.clone();
    let tokens: usize = PROMPTS.iter().map(|p| p + STEPS).sum();
    let c = c.with_token_capacity(tokens, 1.0);
    match homes {
        None => c,
        Some(f) => c.with_fast_homes(f, 0.10),
    }
}

/// Prefills the three prompts, decodes `STEPS - 1` steps and returns every layer's output
/// and the totals; checks the accounting after each step and that removing the sequences
/// empties both homes. With `abort_at`, that decode step is begun, attended in layer 0
/// and aborted, then run again.
fn run(cfg: CacheConfig, algo: Box<dyn SparseAlgorithm>, abort_at: Option<usize>) -> (Vec<Tensor>, StepStats) {
    let mut r = rng(11);
    let mut cache = SpinCache::new_boxed(cfg, algo).unwrap();
    let seqs: Vec<_> = (0..3).map(|_| cache.add_sequence().unwrap()).collect();
    let mut outs = Vec::new();
    for step in 0..STEPS {
        let inputs: Vec<StepInput> = seqs
            .iter()
            .zip(PROMPTS)
            .map(|(&seq, p)| StepInput {
                seq,
                new_tokens: if step == 0 { p } else { 1 },
            })
            .collect();
        if abort_at == Some(step) {
            // Another draw of q/k/v: whatever it wrote must be gone after the abort.
            let mut scratch = rng(99);
            cache.begin_step(&inputs).unwrap();
            let t = inputs.len();
            let dev = cache.config().device.clone();
            let x = common::randn(&mut scratch, &[t, 4, 64], 1.0).to_device(&dev).unwrap();
            let kv = common::randn(&mut scratch, &[t, 2, 64], 3.0).to_device(&dev).unwrap();
            cache.attend(0, &x, &kv, &kv).unwrap();
            cache.abort_step().unwrap();
        }
        outs.extend(random_step(&mut cache, &inputs, &mut r).into_iter().map(|l| l.out));
        cache.verify_accounting().unwrap();
    }
    let stats = cache.stats();
    for s in seqs {
        cache.remove_sequence(s).unwrap();
    }
    let u = cache.pool_usage();
    assert_eq!(
        (u.host_used, u.fast_home_used, u.fast_resident),
        (0, 0, 0),
        "removal frees both homes and the cached copies: {u:?}"
    );
    cache.verify_accounting().unwrap();
    (outs, stats)
}

fn check_equal(device: &Device, make: &dyn Fn() -> Box<dyn SparseAlgorithm>, abort_at: Option<usize>, tol: f64) {
    let full_cfg = config(None, device);
    let cfg = config(Some(0.5), device);
    assert!(
        cfg.host_pages < full_cfg.host_pages && cfg.total_pages() == full_cfg.host_pages,
        "the host tier alone ({} pages) cannot hold the {} pages the sequences take",
        cfg.host_pages,
        full_cfg.host_pages
    );
    let page_bytes = cfg.page_bytes() as u64;
    let (full, _) = run(full_cfg, make(), abort_at);
    let (homed, stats) = run(cfg, make(), abort_at);
    assert_eq!(full.len(), homed.len());
    for (i, (a, b)) in full.iter().zip(&homed).enumerate() {
        let err = max_abs_diff(a, b);
        assert!(
            err < tol,
            "output {i}: fast homes differ from the all-in-HBM cache by {err}"
        );
    }
    assert!(stats.misses > 0, "the host-homed pages go through the cache: {stats:?}");
    // Fetched and spilled pages, plus the values of rebuilt pages read from the host tier.
    let fetched = (stats.misses + stats.spilled) * page_bytes;
    let rebuilt_max = stats.rebuilt_pages * page_bytes / 2;
    assert!(
        (fetched..=fetched + rebuilt_max).contains(&stats.bytes_moved),
        "{stats:?}"
    );
    if stats.rebuilt_pages == 0 {
        assert_eq!(stats.bytes_moved, fetched, "{stats:?}");
    }
}

#[test]
fn dense_with_fast_homes_equals_all_in_hbm() {
    check_equal(&Device::Cpu, &|| Box::new(Dense::new()), None, 1e-5);
}

#[test]
fn quest_with_fast_homes_and_an_aborted_step_equals_all_in_hbm() {
    check_equal(&Device::Cpu, &quest, Some(7), 1e-5);
}

fn quest() -> Box<dyn SparseAlgorithm> {
    Box::new(Quest::new(QuestConfig {
        budget_tokens: 128,
        dense_layers: 0,
        ..Default::default()
    }))
}

/// The same on GPU 0 (f32): the pinned host tier's append skips homed ids, the fused
/// write-through + min/max kernel writes them in their fast homes, and the abort reads
/// their keys there.
#[cfg(feature = "cuda")]
#[test]
fn cuda_cache_with_fast_homes_equals_all_in_hbm() {
    let Some(gpu) = common::cuda_or_skip("cuda_cache_with_fast_homes_equals_all_in_hbm") else {
        return;
    };
    check_equal(&gpu, &|| Box::new(Dense::new()), None, 1e-4);
    check_equal(&gpu, &quest, Some(7), 1e-4);
}

#[test]
fn shadowkv_with_fast_homes_equals_all_in_hbm() {
    check_equal(
        &Device::Cpu,
        &|| {
            Box::new(
                ShadowKv::new(ShadowKvConfig {
                    chunk_tokens: 16,
                    rank: 32,
                    sparse_budget_tokens: 128,
                    outlier_chunks: 2,
                    window_tokens: 32,
                })
                .unwrap(),
            )
        },
        None,
        1e-4,
    );
}

#[test]
fn the_pool_holds_host_plus_fast_homes_then_pushes_back() {
    let mut c = CacheConfig::new(1, 2, 1, 16);
    c.page_size = 8;
    c.host_pages = 10;
    c.fast_pages = 8;
    c.fast_home_pages = 6;
    let mut cache = SpinCache::new(c, Dense::new()).unwrap();
    let a = cache.add_sequence().unwrap();
    let b = cache.add_sequence().unwrap();
    let mut r = rng(3);
    // 12 pages: the 6 fast homes first, then 6 host pages.
    random_step(&mut cache, &[StepInput { seq: a, new_tokens: 96 }], &mut r);
    let u = cache.pool_usage();
    assert_eq!((u.fast_home_used, u.host_used), (6, 6), "{u:?}");
    // 5 more pages do not fit in the 4 left: back-pressure, nothing changed.
    let err = cache.begin_step(&[StepInput { seq: b, new_tokens: 40 }]).unwrap_err();
    assert!(matches!(err, Error::PoolExhausted { needed: 5, free: 4, .. }), "{err}");
    assert_eq!(cache.pool_usage(), u);
    random_step(&mut cache, &[StepInput { seq: b, new_tokens: 32 }], &mut r);
    assert_eq!(cache.pool_usage().host_used, 10);
    cache.remove_sequence(a).unwrap();
    let u = cache.pool_usage();
    assert_eq!((u.fast_home_used, u.host_used), (0, 4), "{u:?}");
    // The freed fast homes are taken first again.
    random_step(&mut cache, &[StepInput { seq: b, new_tokens: 8 }], &mut r);
    assert_eq!(cache.pool_usage().fast_home_used, 1);
    cache.verify_accounting().unwrap();
}
