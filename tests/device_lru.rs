//! The device LRU ([`DeviceLru`]) against the host policy: random schedules (5 owners,
//! budgets that change between rounds, invalidations of single host slots and of whole
//! owners, NONE entries, caches small enough to defer requests, deferred requests retried
//! in later rounds) replayed on a CPU `DeviceLru` and on [`BucketedLru`] +
//! [`BudgetTracker`] must give the same per-request outcome (hit slot, miss slot,
//! deferred), the same resident set and per-owner resident counts, the same hit / miss /
//! deferred counters and the same per-owner reuse counts as `BudgetTracker::observe`.
//! With the `cuda` feature the same schedules also run on GPU 0 and must match the CPU
//! `DeviceLru` exactly (misses compared as sets, since their order is free on the GPU);
//! that test returns early when no GPU is present.

mod common;

use candle_core::{Device, Tensor};
use common::{rng, u32s};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use spinkv::ops::NONE;
use spinkv::pool::{BucketedLru, BudgetPolicy, BudgetTracker, Resolve};
use spinkv::tiered::{DeviceLru, ResolveOutput, ResolveRequest};
use std::collections::{BTreeSet, HashSet};

const OWNERS: usize = 5;

#[derive(Debug, Clone, Copy)]
struct Config {
    buckets: usize,
    ways: usize,
    host_slots: usize,
    steps: u32,
    layers: usize,
    reuse_steps: u32,
    max_per_owner: usize,
}

const CONFIGS: [Config; 4] = [
    // Tiny: most rounds defer.
    Config {
        buckets: 3,
        ways: 2,
        host_slots: 120,
        steps: 40,
        layers: 2,
        reuse_steps: 2,
        max_per_owner: 5,
    },
    Config {
        buckets: 8,
        ways: 4,
        host_slots: 300,
        steps: 40,
        layers: 3,
        reuse_steps: 3,
        max_per_owner: 9,
    },
    // No reuse tracking.
    Config {
        buckets: 5,
        ways: 3,
        host_slots: 200,
        steps: 30,
        layers: 2,
        reuse_steps: 0,
        max_per_owner: 7,
    },
    // Roomy: mostly hits.
    Config {
        buckets: 64,
        ways: 8,
        host_slots: 400,
        steps: 30,
        layers: 2,
        reuse_steps: 2,
        max_per_owner: 12,
    },
];

/// The host model: the policy code the cache runs.
struct Model {
    lru: BucketedLru,
    tracker: BudgetTracker,
    budgets: Vec<u32>,
}

impl Model {
    fn set_budgets(&mut self, b: &[u32]) {
        self.budgets = b.to_vec();
        for (o, &x) in b.iter().enumerate() {
            let pages = if x == u32::MAX { usize::MAX } else { x as usize };
            self.tracker.set_budget(o as u64, pages);
        }
    }
}

/// Host slots held by one owner: `active` may be requested; `dead` were invalidated
/// (never requested again until the owner retires, so the tracker's per-owner history and
/// the device's per-slot history agree).
#[derive(Default, Clone)]
struct Owner {
    active: Vec<u32>,
    dead: Vec<u32>,
}

fn random_budgets(r: &mut StdRng, cap: usize) -> Vec<u32> {
    (0..OWNERS)
        .map(|_| {
            if r.random_bool(0.2) {
                u32::MAX
            } else {
                r.random_range(0..=(cap / 2 + 1) as u32)
            }
        })
        .collect()
}

/// Host view of one round's output: (fast pairs, spill pairs, misses as a set, count,
/// per request whether its fast pair is in `ready_pairs`).
type Round = (Vec<u32>, Vec<u32>, BTreeSet<(u32, u32)>, u32, Vec<bool>);

/// Also checks the fused attention's list against the other outputs and the requests'
/// host slots `hs`: ready rows read their fast slot; a miss (the first row of the round
/// naming its slot) reads its host slot and fills the fast one; repeats and deferred
/// rows read their host slot only.
fn host_round(out: &ResolveOutput, hs: &Tensor) -> Round {
    let (fast, spill, misses) = (u32s(&out.fast_pairs), u32s(&out.spill_pairs), u32s(&out.misses));
    let (ready, fetched) = (u32s(&out.ready_pairs), u32s(&out.fetched_pairs));
    let (tiered, src, hs) = (u32s(&out.tiered_pairs), u32s(&out.tiered_src), u32s(hs));
    let mut is_ready = Vec::with_capacity(fast.len() / 2);
    let mut named = HashSet::new();
    for (i, f) in fast.chunks(2).enumerate() {
        let (r, x) = (&ready[2 * i..2 * i + 2], &fetched[2 * i..2 * i + 2]);
        let none = [NONE, NONE];
        // ready_pairs and fetched_pairs split fast_pairs.
        // Each row is in exactly one; a NONE row of fast_pairs is NONE in both.
        let ok = (r == f && x == none) || (x == f && r == none);
        assert!(ok, "row {i}: fast {f:?}, ready {r:?}, fetched {x:?}");
        is_ready.push(f != none && r == f);
        let first = f[0] != NONE && named.insert(f[0]);
        let sp = &spill[2 * i..2 * i + 2];
        let want: ([u32; 2], u32) = if f[0] != NONE && r == f {
            ([f[0], f[1]], NONE)
        } else if f[0] != NONE && first {
            ([f[0], f[1]], hs[i])
        } else if f[0] != NONE {
            ([NONE, f[1]], hs[i])
        } else if sp[0] != NONE {
            ([NONE, sp[1]], sp[0])
        } else {
            ([NONE, NONE], NONE)
        };
        assert_eq!(
            (&tiered[2 * i..2 * i + 2], src[i]),
            (&want.0[..], want.1),
            "row {i}: tiered entry (fast {f:?}, ready {r:?}, spill {sp:?}, host slot {})",
            hs[i]
        );
    }
    let count = u32s(&out.miss_count)[0];
    let set: BTreeSet<(u32, u32)> = misses.chunks(2).take(count as usize).map(|p| (p[0], p[1])).collect();
    assert_eq!(set.len(), count as usize, "misses are distinct");
    assert!(
        misses[2 * count as usize..].iter().all(|&x| x == NONE),
        "rows after miss_count are NONE"
    );
    (fast, spill, set, count, is_ready)
}

/// Replays a random schedule on every LRU of `lrus` (all fresh, same geometry) and on the
/// host model; checks each against the model after every round and step, and returns
/// nothing. `lrus[0]` is compared with the others exactly (stamps included).
fn run_schedule(seed: u64, c: Config, lrus: &mut [DeviceLru]) {
    let mut r = rng(seed);
    let cap = c.buckets * c.ways;
    let mut model = Model {
        lru: BucketedLru::new(c.buckets, c.ways),
        tracker: BudgetTracker::new(
            BudgetPolicy::Dynamic {
                window_steps: 4,
                reuse_steps: c.reuse_steps as u64,
                floor_pages: 1,
            },
            cap,
        ),
        budgets: vec![],
    };
    let budgets = random_budgets(&mut r, cap);
    model.set_budgets(&budgets);
    for l in lrus.iter_mut() {
        l.set_budgets(&budgets).unwrap();
    }
    let mut free: Vec<u32> = (0..c.host_slots as u32).rev().collect();
    let mut owners = vec![Owner::default(); OWNERS];
    let (mut hits, mut misses, mut deferred) = (0u64, 0u64, 0u64);
    for step in 1..=c.steps {
        for _layer in 0..c.layers {
            // One layer: requests of every owner (recent pages, some new), shuffled, a few
            // NONE entries; then rounds until nothing is deferred.
            let mut pending: Vec<(u32, u32, u32)> = Vec::new();
            for (o, ow) in owners.iter_mut().enumerate() {
                let k = r.random_range(0..=c.max_per_owner);
                let mut seen = HashSet::new();
                for _ in 0..k {
                    let fresh = ow.active.is_empty() || r.random_bool(0.3);
                    let hs = if fresh {
                        match free.pop() {
                            Some(h) => {
                                ow.active.push(h);
                                h
                            }
                            None => continue,
                        }
                    } else {
                        let recent = ow.active.len().min(2 * c.max_per_owner);
                        ow.active[ow.active.len() - 1 - r.random_range(0..recent)]
                    };
                    if seen.insert(hs) {
                        pending.push((hs, 1000 * o as u32 + hs, o as u32));
                    }
                }
            }
            pending.shuffle(&mut r);
            for _ in 0..r.random_range(0..3) {
                let at = r.random_range(0..=pending.len());
                pending.insert(at, (NONE, 7, r.random_range(0..OWNERS as u32)));
            }
            let mut rounds = 0;
            while !pending.is_empty() {
                rounds += 1;
                assert!(rounds < 1000, "no progress");
                // Host model.
                model.lru.begin_round();
                let mut expect = Vec::with_capacity(pending.len());
                for &(hs, _, o) in &pending {
                    if hs == NONE {
                        expect.push(None);
                        continue;
                    }
                    if c.reuse_steps > 0 {
                        model.tracker.observe(o as u64, [hs]);
                    }
                    expect.push(Some(model.lru.resolve_for(hs, o as u64, &model.tracker)));
                }
                // Devices.
                let n = pending.len();
                let mut results: Vec<Round> = Vec::new();
                for l in lrus.iter_mut() {
                    let d = l.device().clone();
                    let col = |k: usize| {
                        Tensor::from_vec(pending.iter().map(|p| [p.0, p.1, p.2][k]).collect::<Vec<u32>>(), n, &d)
                            .unwrap()
                    };
                    let (hs_t, lp_t, ow_t) = (col(0), col(1), col(2));
                    let out = l
                        .resolve(&ResolveRequest {
                            host_slots: &hs_t,
                            logical: &lp_t,
                            owners: &ow_t,
                            step,
                            reuse_steps: c.reuse_steps,
                        })
                        .unwrap();
                    assert_eq!(out.fast_pairs.dims(), &[n, 2]);
                    results.push(host_round(&out, &hs_t));
                }
                let mut next = Vec::new();
                let mut miss_set = BTreeSet::new();
                // Slots pinned by earlier requests of the round: a hit on one is not ready.
                let mut pinned = HashSet::new();
                for (i, e) in expect.iter().enumerate() {
                    let (hs, lp, _) = pending[i];
                    let mut ready = false;
                    let (fast, spill) = match e {
                        None => ([NONE, NONE], [NONE, NONE]),
                        Some(Resolve::Hit(s)) => {
                            hits += 1;
                            ready = pinned.insert(*s);
                            ([*s, lp], [NONE, NONE])
                        }
                        Some(Resolve::Miss { slot, .. }) => {
                            misses += 1;
                            miss_set.insert((hs, *slot));
                            pinned.insert(*slot);
                            ([*slot, lp], [NONE, NONE])
                        }
                        Some(Resolve::Deferred) => {
                            deferred += 1;
                            next.push(pending[i]);
                            ([NONE, NONE], [hs, lp])
                        }
                    };
                    for (li, res) in results.iter().enumerate() {
                        assert_eq!(
                            (&res.0[2 * i..2 * i + 2], &res.1[2 * i..2 * i + 2]),
                            (&fast[..], &spill[..]),
                            "seed {seed} {c:?} lru {li} step {step} round {rounds} request {i} ({hs}, owner {}): host says {e:?}",
                            pending[i].2
                        );
                        assert_eq!(
                            res.4[i], ready,
                            "lru {li} step {step} request {i}: ready before the fetch"
                        );
                    }
                }
                for (li, res) in results.iter().enumerate() {
                    assert_eq!(res.2, miss_set, "lru {li}: misses (host slot, fast slot)");
                    assert_eq!(res.3 as usize, miss_set.len());
                }
                check_state(&model, lrus, c, &format!("seed {seed} step {step} round {rounds}"));
                pending = next;
                // Between rounds: new budgets, or single host slots freed.
                if r.random_bool(0.15) {
                    let b = random_budgets(&mut r, cap);
                    model.set_budgets(&b);
                    for l in lrus.iter_mut() {
                        l.set_budgets(&b).unwrap();
                    }
                }
                if r.random_bool(0.1) {
                    let o = r.random_range(0..OWNERS);
                    let ow = &mut owners[o];
                    let mut gone = Vec::new();
                    for _ in 0..r.random_range(1..4) {
                        if ow.active.is_empty() {
                            break;
                        }
                        let k = r.random_range(0..ow.active.len());
                        let h = ow.active.swap_remove(k);
                        // A pending (deferred) request of that slot is dropped with it.
                        pending.retain(|p| p.0 != h);
                        ow.dead.push(h);
                        gone.push(h);
                    }
                    for &h in &gone {
                        model.lru.invalidate(h);
                    }
                    for l in lrus.iter_mut() {
                        l.invalidate(&gone).unwrap();
                    }
                    check_state(&model, lrus, c, "after invalidate");
                }
            }
        }
        // End of step: counters and reuse, then new budgets; sometimes an owner retires.
        let mut first: Option<(Vec<u32>, [u64; 3])> = None;
        for l in lrus.iter_mut() {
            let got = l.take_step_counters().unwrap();
            let reuse: Vec<u32> = (0..OWNERS).map(|o| model.tracker.step_reuse(o as u64) as u32).collect();
            assert_eq!(got.0, reuse, "seed {seed} {c:?} step {step}: per-owner reuse");
            assert_eq!(
                got.1,
                [hits, misses, deferred],
                "seed {seed} {c:?} step {step}: counters"
            );
            if let Some(f) = &first {
                assert_eq!(&got, f);
            }
            first = Some(got);
        }
        (hits, misses, deferred) = (0, 0, 0);
        model.tracker.end_step();
        if r.random_bool(0.15) {
            let o = r.random_range(0..OWNERS);
            let ow = std::mem::take(&mut owners[o]);
            let mut all = ow.active;
            all.extend(ow.dead);
            for &h in &all {
                model.lru.invalidate(h);
            }
            for l in lrus.iter_mut() {
                l.invalidate(&all).unwrap();
            }
            model.tracker.remove(o as u64);
            all.shuffle(&mut r);
            free.extend(all);
            check_state(&model, lrus, c, "after retirement");
        }
        let b = if r.random_bool(0.5) {
            random_budgets(&mut r, cap)
        } else {
            model.budgets.clone()
        };
        model.set_budgets(&b);
        for l in lrus.iter_mut() {
            l.set_budgets(&b).unwrap();
        }
    }
}

/// Resident set (slot by slot), per-owner resident counts and lookups against the model;
/// every LRU's full state (stamps included) against the first's.
fn check_state(model: &Model, lrus: &[DeviceLru], c: Config, ctx: &str) {
    let first = lrus[0].snapshot().unwrap();
    for (li, l) in lrus.iter().enumerate() {
        let (tags, owners, stamps) = l.snapshot().unwrap();
        assert_eq!(tags.len(), c.buckets * c.ways);
        let resident: Vec<u32> = tags.iter().copied().filter(|&t| t != NONE).collect();
        assert_eq!(
            resident.len(),
            model.lru.resident_count(),
            "{ctx}: lru {li} resident count"
        );
        for (s, &t) in tags.iter().enumerate() {
            if t != NONE {
                assert_eq!(
                    model.lru.lookup(t),
                    Some(s as u32),
                    "{ctx}: lru {li} slot {s} holds {t}"
                );
            } else {
                assert_eq!((owners[s], stamps[s]), (NONE, 0), "{ctx}: lru {li} empty slot {s}");
            }
        }
        let counts = l.resident_counts().unwrap();
        for (o, &count) in counts.iter().enumerate().take(OWNERS) {
            let held = owners.iter().filter(|&&x| x == o as u32).count();
            assert_eq!(count as usize, held, "{ctx}: lru {li} owner {o} count vs owners");
            assert_eq!(
                held,
                model.lru.resident_of(o as u64),
                "{ctx}: lru {li} owner {o} resident"
            );
        }
        // Lookup of every resident page, a few absent ones and NONE.
        let mut q = resident.clone();
        q.extend([NONE, c.host_slots as u32 + 5]);
        let qt = Tensor::from_vec(q.clone(), q.len(), l.device()).unwrap();
        let got = u32s(&l.lookup(&qt).unwrap());
        // (BucketedLru::lookup(NONE) would find an empty way: NONE is its empty tag.)
        let want: Vec<u32> = q
            .iter()
            .map(|&h| {
                if h == NONE {
                    NONE
                } else {
                    model.lru.lookup(h).unwrap_or(NONE)
                }
            })
            .collect();
        assert_eq!(got, want, "{ctx}: lru {li} lookup");
        // Write-through destinations of the same queries (rows in a page of 16).
        let rows: Vec<u32> = (0..q.len() as u32).map(|i| (i * 5) % 16).collect();
        let rt = Tensor::from_vec(rows.clone(), rows.len(), l.device()).unwrap();
        let dst = u32s(&l.fast_destinations(&qt, &rt, 16).unwrap());
        let want_dst: Vec<u32> = want
            .iter()
            .zip(&rows)
            .map(|(&f, &r)| if f == NONE { NONE } else { f * 16 + r })
            .collect();
        assert_eq!(dst, want_dst, "{ctx}: lru {li} fast destinations");
        assert_eq!(
            (tags, owners, stamps),
            first,
            "{ctx}: lru {li} state differs from lru 0"
        );
    }
}

#[test]
fn cpu_device_lru_matches_bucketed_lru_and_budget_tracker() {
    for (ci, &c) in CONFIGS.iter().enumerate() {
        for seed in 0..6 {
            let mut lrus = vec![DeviceLru::new(c.buckets, c.ways, OWNERS, c.host_slots, &Device::Cpu).unwrap()];
            run_schedule(100 * ci as u64 + seed, c, &mut lrus);
        }
    }
}

#[test]
fn stamps_follow_request_order_and_the_clock() {
    let d = Device::Cpu;
    let mut l = DeviceLru::new(1, 4, 2, 16, &d).unwrap();
    let t = |v: &[u32]| Tensor::from_slice(v, v.len(), &d).unwrap();
    let (hs, lp, ow) = (t(&[3, NONE, 5]), t(&[30, 0, 50]), t(&[0, 0, 1]));
    let req = ResolveRequest {
        host_slots: &hs,
        logical: &lp,
        owners: &ow,
        step: 1,
        reuse_steps: 2,
    };
    let out = l.resolve(&req).unwrap();
    assert_eq!(u32s(&out.fast_pairs), vec![0, 30, NONE, NONE, 1, 50]);
    assert_eq!(u32s(&out.miss_count), vec![2]);
    let (tags, owners, stamps) = l.snapshot().unwrap();
    assert_eq!(&tags[..2], &[3, 5]);
    assert_eq!(&owners[..2], &[0, 1]);
    assert_eq!(&stamps[..2], &[1, 3], "request i gets clock + i + 1");
    let out = l.resolve(&req).unwrap();
    assert_eq!(u32s(&out.miss_count), vec![0]);
    assert_eq!(&l.snapshot().unwrap().2[..2], &[4, 6], "the clock advanced by n = 3");
    assert_eq!(u32s(&l.lookup(&t(&[5, 4, NONE])).unwrap()), vec![1, NONE, NONE]);
    let (reuse, counters) = l.take_step_counters().unwrap();
    assert_eq!(reuse, vec![0, 0], "same step: no reuse");
    assert_eq!(counters, [2, 2, 0]);
}

/// A round that requests the same host slot twice: the second request hits a slot the
/// first pinned (fetched in this round for a miss), so only hits on slots no earlier
/// request pinned are ready before the fetch.
fn repeats_are_not_ready(d: &Device) {
    let mut l = DeviceLru::new(1, 4, 2, 16, d).unwrap();
    let t = |v: &[u32]| Tensor::from_slice(v, v.len(), d).unwrap();
    let round = |l: &mut DeviceLru, hs: &[u32], step: u32| {
        let lp: Vec<u32> = (0..hs.len() as u32).map(|i| 100 + i).collect();
        let (a, b, c) = (t(hs), t(&lp), t(&vec![0; hs.len()]));
        host_round(
            &l.resolve(&ResolveRequest {
                host_slots: &a,
                logical: &b,
                owners: &c,
                step,
                reuse_steps: 0,
            })
            .unwrap(),
            &a,
        )
    };
    // 3 misses then hits it (fetched), 5 misses, 3 again (still this round: fetched).
    let r = round(&mut l, &[3, 3, 5, NONE, 3], 1);
    assert_eq!(r.4, vec![false; 5], "{:?}: a miss and repeats of it", d.location());
    assert_eq!(r.3, 2);
    // Next round: 3 and 5 are resident. First requests are ready, the repeat is not.
    let r = round(&mut l, &[5, 3, 5, 7], 2);
    assert_eq!(
        r.4,
        vec![true, true, false, false],
        "{:?}: hits, a repeat, a miss",
        d.location()
    );
    assert_eq!(r.0[..6], [1, 100, 0, 101, 1, 102], "fast pairs still hold every hit");
}

#[test]
fn hits_on_slots_pinned_earlier_in_the_round_are_not_ready() {
    repeats_are_not_ready(&Device::Cpu);
    #[cfg(feature = "cuda")]
    if let Some(gpu) = common::cuda_or_skip("hits_on_slots_pinned_earlier_in_the_round_are_not_ready") {
        spinkv::ops::set_poison_outputs(true);
        repeats_are_not_ready(&gpu);
    }
}

#[test]
fn bad_requests_are_rejected() {
    let d = Device::Cpu;
    let mut l = DeviceLru::new(2, 2, 2, 8, &d).unwrap();
    let t = |v: &[u32]| Tensor::from_slice(v, v.len(), &d).unwrap();
    let ok = t(&[1, 0]);
    let bad_slot = t(&[1, 8]);
    let bad_owner = t(&[0, 2]);
    let short = t(&[1]);
    let req = |hs, ow, step| ResolveRequest {
        host_slots: hs,
        logical: &ok,
        owners: ow,
        step,
        reuse_steps: 0,
    };
    assert!(l.resolve(&req(&bad_slot, &ok, 1)).is_err());
    assert!(l.resolve(&req(&ok, &bad_owner, 1)).is_err());
    assert!(l.resolve(&req(&ok, &short, 1)).is_err());
    assert!(l.resolve(&req(&ok, &ok, 0)).is_err());
    assert!(l.set_budgets(&[1]).is_err());
    assert!(l.invalidate(&[8]).is_err());
    assert!(DeviceLru::new(0, 2, 2, 8, &d).is_err());
    // Nothing was changed by the rejected calls.
    assert!(l.snapshot().unwrap().0.iter().all(|&x| x == NONE));
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_device_lru_matches_the_cpu_reference() {
    let Some(gpu) = common::cuda_or_skip("cuda_device_lru_matches_the_cpu_reference") else {
        return;
    };
    spinkv::ops::set_poison_outputs(true);
    for (ci, &c) in CONFIGS.iter().enumerate() {
        for seed in 0..6 {
            let mut lrus = vec![
                DeviceLru::new(c.buckets, c.ways, OWNERS, c.host_slots, &Device::Cpu).unwrap(),
                DeviceLru::new(c.buckets, c.ways, OWNERS, c.host_slots, &gpu).unwrap(),
            ];
            run_schedule(100 * ci as u64 + seed, c, &mut lrus);
        }
    }
    // A large round: many requests per bucket (long lists to sort), many owners.
    let (buckets, ways, owners, host) = (257, 8, 37, 1 << 16);
    let mut r = rng(9);
    let mut cpu = DeviceLru::new(buckets, ways, owners, host, &Device::Cpu).unwrap();
    let mut gl = DeviceLru::new(buckets, ways, owners, host, &gpu).unwrap();
    for step in 1..=6u32 {
        let b: Vec<u32> = (0..owners).map(|_| r.random_range(0..120)).collect();
        cpu.set_budgets(&b).unwrap();
        gl.set_budgets(&b).unwrap();
        let mut slots: Vec<u32> = (0..4096u32).map(|i| (i * 7 + step * 3) % host as u32).collect();
        slots.sort_unstable();
        slots.dedup();
        slots.shuffle(&mut r);
        let n = slots.len();
        let own: Vec<u32> = slots.iter().map(|&h| h % owners as u32).collect();
        let lp: Vec<u32> = (0..n as u32).collect();
        let mut rounds = Vec::new();
        for l in [&mut cpu, &mut gl] {
            let d = l.device().clone();
            let (a, b2, c2) = (
                Tensor::from_slice(&slots, n, &d).unwrap(),
                Tensor::from_slice(&lp, n, &d).unwrap(),
                Tensor::from_slice(&own, n, &d).unwrap(),
            );
            let out = l
                .resolve(&ResolveRequest {
                    host_slots: &a,
                    logical: &b2,
                    owners: &c2,
                    step,
                    reuse_steps: 2,
                })
                .unwrap();
            rounds.push(host_round(&out, &a));
        }
        assert_eq!(rounds[0], rounds[1], "large round, step {step}");
        assert_eq!(
            cpu.snapshot().unwrap(),
            gl.snapshot().unwrap(),
            "large round state, step {step}"
        );
        assert_eq!(cpu.resident_counts().unwrap(), gl.resident_counts().unwrap());
        assert_eq!(cpu.take_step_counters().unwrap(), gl.take_step_counters().unwrap());
    }
}

/// A bucket holds at most `MAX_WAYS` ways (the CUDA round keeps a bucket's ways in one
/// warp's lanes): more is an error naming the ways, as is a cache configured with more.
#[test]
fn more_ways_than_a_warp_holds_are_rejected() {
    use spinkv::tiered::device_lru::MAX_WAYS;
    assert!(DeviceLru::new(2, MAX_WAYS, 1, 8, &Device::Cpu).is_ok());
    let e = DeviceLru::new(2, MAX_WAYS + 1, 1, 8, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("DeviceLru") && e.contains("ways 33"), "{e}");
    let mut cfg = spinkv::CacheConfig::new(1, 2, 1, 8);
    cfg.lru_ways = MAX_WAYS + 1;
    let e = spinkv::SpinCache::new(cfg, spinkv::partition::Dense::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("lru_ways (33)"), "{e}");
}
