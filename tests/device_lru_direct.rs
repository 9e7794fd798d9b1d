//! The direct-mapped fast tier ([`DeviceLru::direct`]): every valid request hits the fast
//! slot of its own host slot. Random rounds of odd sizes with NONE entries are checked
//! against a plain reference written here (pairs, hit counters, lookups, write-through
//! destinations); the no-op maintenance calls (invalidate, clear) and the errors are
//! checked on the CPU. With the `cuda` feature the same rounds run on GPU 0 with poisoned
//! outputs, where out-of-range host slots are skipped (NONE) instead of rejected.
//! A cache whose fast tier holds every host page is direct-mapped and reports its pages
//! as resident.

mod common;

use candle_core::{Device, Tensor};
use common::{rng, u32s};
use rand::Rng;
use spinkv::ops::NONE;
use spinkv::partition::Dense;
use spinkv::tiered::{DeviceLru, ResolveRequest};
use spinkv::{CacheConfig, SparseKvCache, SpinCache, StepInput};

const OWNERS: usize = 3;

/// Random requests over host slots `0..range` (about one in eight NONE).
fn requests(seed: u64, n: usize, range: u32) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut r = rng(seed);
    let hs = (0..n)
        .map(|_| {
            if r.random_range(0..8) == 0 {
                NONE
            } else {
                r.random_range(0..range)
            }
        })
        .collect();
    let lp = (0..n).map(|_| r.random_range(0..100_000)).collect();
    let ow = (0..n).map(|_| r.random_range(0..OWNERS as u32)).collect();
    (hs, lp, ow)
}

/// The plain reference: (slot, logical) where the slot is valid, else (NONE, NONE).
fn expected(hs: &[u32], lp: &[u32], cap: usize) -> (Vec<u32>, u64) {
    let mut pairs = Vec::new();
    let mut hits = 0;
    for (&h, &l) in hs.iter().zip(lp) {
        if h != NONE && (h as usize) < cap {
            pairs.extend([h, l]);
            hits += 1;
        } else {
            pairs.extend([NONE, NONE]);
        }
    }
    (pairs, hits)
}

/// Runs rounds of odd sizes on `l` (slots drawn from `0..range`) and checks every output.
fn check_rounds(l: &mut DeviceLru, cap: usize, range: u32) {
    let d = l.device().clone();
    let t = |v: &[u32]| Tensor::from_slice(v, v.len(), &d).unwrap();
    for (i, &n) in [1usize, 31, 33, 1000, 70_001].iter().enumerate() {
        let (hs, lp, ow) = requests(i as u64, n, range);
        let (want, hits) = expected(&hs, &lp, cap);
        let (a, b, c) = (t(&hs), t(&lp), t(&ow));
        let req = ResolveRequest {
            host_slots: &a,
            logical: &b,
            owners: &c,
            step: 1 + i as u32,
            reuse_steps: 2,
        };
        let pairs = l.resolve_direct(&req).unwrap();
        assert_eq!(pairs.dims(), [n, 2]);
        assert_eq!(u32s(&pairs), want, "round of {n}");
        // `resolve` gives the same pairs and nothing to fetch or spill.
        let out = l.resolve(&req).unwrap();
        assert_eq!(u32s(&out.fast_pairs), want, "resolve, round of {n}");
        assert!(u32s(&out.spill_pairs).iter().all(|&x| x == NONE));
        assert_eq!(u32s(&out.miss_count), vec![0]);
        let (reuse, counters) = l.take_step_counters().unwrap();
        assert_eq!(counters, [2 * hits, 0, 0], "round of {n}: two rounds of hits");
        assert_eq!(reuse, vec![0; OWNERS], "no reuse tracking");
        // Lookups and write-through destinations.
        let want_slots: Vec<u32> = hs.iter().map(|&h| if (h as usize) < cap { h } else { NONE }).collect();
        assert_eq!(u32s(&l.lookup(&a).unwrap()), want_slots);
        let rows: Vec<u32> = (0..n as u32).map(|x| x % 16).collect();
        let dst: Vec<u32> = want_slots
            .iter()
            .zip(&rows)
            .map(|(&s, &r)| if s == NONE { NONE } else { s * 16 + r })
            .collect();
        assert_eq!(u32s(&l.fast_destinations(&a, &t(&rows), 16).unwrap()), dst);
    }
}

#[test]
fn cpu_direct_rounds_match_the_reference() {
    let cap = 50_000;
    let mut l = DeviceLru::direct(OWNERS, cap, &Device::Cpu).unwrap();
    assert!(l.is_direct());
    assert_eq!((l.capacity(), l.buckets(), l.ways()), (cap, cap, 1));
    check_rounds(&mut l, cap, cap as u32);
    // Maintenance calls change nothing; residency is the whole capacity.
    l.invalidate(&[0, 7, NONE]).unwrap();
    l.clear().unwrap();
    assert_eq!(l.resident_count().unwrap(), cap);
    assert_eq!(l.snapshot().unwrap(), (vec![], vec![], vec![]));
}

#[test]
fn direct_errors() {
    let d = Device::Cpu;
    assert!(DeviceLru::direct(0, 8, &d).is_err());
    assert!(DeviceLru::direct(2, 0, &d).is_err());
    let mut l = DeviceLru::direct(2, 8, &d).unwrap();
    let t = |v: &[u32]| Tensor::from_slice(v, v.len(), &d).unwrap();
    let (ok, bad_slot, bad_owner) = (t(&[1, 0]), t(&[1, 8]), t(&[0, 2]));
    let req = |hs, ow| ResolveRequest {
        host_slots: hs,
        logical: &ok,
        owners: ow,
        step: 1,
        reuse_steps: 0,
    };
    let e = l.resolve_direct(&req(&bad_slot, &ok)).unwrap_err().to_string();
    assert!(e.contains("host slot 8"), "{e}");
    assert!(l.resolve_direct(&req(&ok, &bad_owner)).is_err());
    assert!(l.invalidate(&[8]).is_err());
    // Nothing was counted by the rejected rounds.
    assert_eq!(l.take_step_counters().unwrap().1, [0, 0, 0]);
    // A set-associative LRU has no direct rounds.
    let mut lru = DeviceLru::new(2, 2, 2, 8, &d).unwrap();
    assert!(!lru.is_direct());
    let e = lru.resolve_direct(&req(&ok, &ok)).unwrap_err().to_string();
    assert!(e.contains("not direct-mapped"), "{e}");
}

#[test]
fn a_cache_with_room_for_every_page_is_direct() {
    let run = |fraction: f64| {
        let cfg = CacheConfig::new(2, 2, 1, 16).with_token_capacity(256, fraction);
        let mut c = SpinCache::new(cfg, Dense).unwrap();
        let s = c.add_sequence().unwrap();
        c.begin_step(&[StepInput { seq: s, new_tokens: 40 }]).unwrap();
        for layer in 0..2 {
            let q = Tensor::ones((40, 2, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
            let k = Tensor::ones((40, 1, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
            c.attend(layer, &q, &k, &k).unwrap();
        }
        c.end_step().unwrap();
        let u = c.pool_usage();
        c.verify_accounting().unwrap();
        c.remove_sequence(s).unwrap();
        assert_eq!(c.pool_usage().host_used, 0);
        u
    };
    let direct = run(1.0);
    assert_eq!(direct.fast_resident, direct.host_used, "{direct:?}");
    assert_eq!(direct.fast_capacity, direct.host_capacity, "{direct:?}");
    let lru = run(0.5);
    assert!(lru.fast_capacity < lru.host_capacity, "{lru:?}");
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_direct_rounds_match_the_reference() {
    let Some(gpu) = common::cuda_or_skip("cuda_direct_rounds_match_the_reference") else {
        return;
    };
    spinkv::ops::set_poison_outputs(true);
    let cap = 50_000;
    let mut l = DeviceLru::direct(OWNERS, cap, &gpu).unwrap();
    // Slots past the capacity: the kernel skips them (the CPU would reject the round).
    check_rounds(&mut l, cap, cap as u32 + 5_000);
    l.invalidate(&[0, 7, NONE]).unwrap();
    l.clear().unwrap();
}
