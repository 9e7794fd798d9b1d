//! `ops::tiered_paged_attention`: each entry attends its page from the fast pool or
//! (where `src` names a host slot) from the host pool, and entries naming both fill the
//! fast slot. The CPU composition (pages gathered, one attention, fills) is checked against one
//! plain `sparse_paged_attention` over the two pools concatenated (host slots renumbered
//! after the fast ones), and its fills against a host-side copy, bit for bit. On CUDA the
//! fused `spa_tier_*` kernel (tensor pools and the pinned host tier) is checked against
//! the CPU composition on random lists mixing hits, fills, host-only entries and padding,
//! with limits that cut pages (the fill's rows past a query's limit) and hide whole pages,
//! long lists (split) and short ones, GQA groups 1–16, head dims 64 and 128, page sizes
//! 16 and 5, into poisoned outputs. Tolerances: outputs as `tests/cuda_ops.rs` (f32 1e-4,
//! f16 4e-3, bf16 1.5e-2 absolute), lse 1e-3 relative; fills bit-exact.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use spinkv::ops::{self, PageList, EMPTY_LSE, NONE};

/// One random call: pools, list, src, and the fills it implies.
struct Case {
    q: Tensor,
    fast: Tensor,
    host: Tensor,
    list: PageList,
    src: Tensor,
    /// (host slot, fast slot) of every fill.
    fills: Vec<(u32, u32)>,
}

struct Shape {
    s: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    p: usize,
    n: usize,
    fast_slots: usize,
    host_slots: usize,
}

/// Entries: 40% fast hits, 25% fills, 20% host-only, 15% padding. Fast slots are drawn
/// without replacement, so a filled slot is read by no other entry.
fn case(r: &mut StdRng, sh: &Shape, dt: DType) -> Case {
    let Shape {
        s,
        hq,
        hkv,
        d,
        p,
        n,
        fast_slots,
        host_slots,
    } = *sh;
    let mut free: Vec<u32> = (0..fast_slots as u32).collect();
    free.shuffle(r);
    let lens: Vec<usize> = (0..s).map(|_| r.random_range(1..=n * p)).collect();
    let (mut pages, mut src, mut fills) = (vec![NONE; s * hkv * n * 2], vec![NONE; s * hkv * n], Vec::new());
    for (si, &len) in lens.iter().enumerate() {
        for h in 0..hkv {
            for j in 0..n {
                let e = (si * hkv + h) * n + j;
                // Logical pages past the length appear too (hidden by the limit).
                let lp = r.random_range(0..(len.div_ceil(p) + 1) as u32);
                let kind = r.random_range(0..100);
                let hs = r.random_range(0..host_slots as u32);
                let (slot, from) = match kind {
                    0..40 => (free.pop().unwrap_or(NONE), NONE),
                    40..65 => match free.pop() {
                        Some(f) => {
                            fills.push((hs, f));
                            (f, hs)
                        }
                        None => (NONE, hs),
                    },
                    65..85 => (NONE, hs),
                    _ => (NONE, NONE),
                };
                pages[2 * e] = slot;
                pages[2 * e + 1] = if slot == NONE && from == NONE { NONE } else { lp };
                src[e] = from;
            }
        }
    }
    // One query per sequence at its last token; the last sequence's limit cuts a page.
    let queries: Vec<u32> = (0..s).flat_map(|si| [si as u32, (lens[si] - 1) as u32]).collect();
    let kv_limit: Vec<u32> = lens
        .iter()
        .enumerate()
        .map(|(si, &l)| {
            if si == s - 1 {
                (l as u32).saturating_sub(3).max(1)
            } else {
                l as u32
            }
        })
        .collect();
    let cpu = &Device::Cpu;
    Case {
        q: randn(r, &[s, hq, d], 1.0).to_dtype(dt).unwrap(),
        fast: randn(r, &[fast_slots, 2, p, d], 1.0).to_dtype(dt).unwrap(),
        host: randn(r, &[host_slots, 2, p, d], 1.0).to_dtype(dt).unwrap(),
        list: PageList {
            pages: Tensor::from_vec(pages, (s, hkv, n, 2), cpu).unwrap(),
            queries: Tensor::from_vec(queries, (s, 2), cpu).unwrap(),
            kv_limit: Tensor::from_vec(kv_limit, s, cpu).unwrap(),
        },
        src: Tensor::from_vec(src, (s, hkv, n), cpu).unwrap(),
        fills,
    }
}

fn tol(dt: DType) -> f32 {
    match dt {
        DType::F32 => 1e-4,
        DType::F16 => 4e-3,
        _ => 1.5e-2,
    }
}

fn assert_close(got: &ops::AttentionPartial, want: &ops::AttentionPartial, dt: DType, what: &str) {
    let (go, wo) = (f32s(&got.out), f32s(&want.out));
    for (i, (g, w)) in go.iter().zip(&wo).enumerate() {
        assert!((g - w).abs() <= tol(dt), "{what}: out[{i}] got {g} want {w}");
    }
    for (i, (g, w)) in f32s(&got.lse).iter().zip(&f32s(&want.lse)).enumerate() {
        if *w == EMPTY_LSE {
            assert_eq!(*g, EMPTY_LSE, "{what}: lse[{i}] should be empty");
        } else {
            assert!(
                (g - w).abs() <= 1e-3 * (1.0 + w.abs()),
                "{what}: lse[{i}] got {g} want {w}"
            );
        }
    }
}

/// The fast pool after the call, computed on the host: `fast` with each fill's slot
/// replaced by its host page.
fn filled(c: &Case) -> Tensor {
    let mut slots: Vec<Tensor> = (0..c.fast.dims()[0]).map(|i| c.fast.get(i).unwrap()).collect();
    for &(hs, f) in &c.fills {
        slots[f as usize] = c.host.get(hs as usize).unwrap();
    }
    Tensor::stack(&slots, 0).unwrap()
}

#[test]
fn the_composition_equals_one_attention_over_both_pools_and_fills_exactly() {
    let mut r = rng(41);
    for (dt, hq, hkv, d, p) in [
        (DType::F32, 6, 2, 24, 5),
        (DType::BF16, 4, 4, 16, 16),
        (DType::F16, 8, 1, 8, 3),
    ] {
        let sh = Shape {
            s: 3,
            hq,
            hkv,
            d,
            p,
            n: 7,
            fast_slots: 53,
            host_slots: 37,
        };
        let c = case(&mut r, &sh, dt);
        assert!(!c.fills.is_empty(), "the case fills some slots");
        let fast = c.fast.copy().unwrap();
        let got = ops::tiered_paged_attention(&c.q, &fast, &c.host, &c.list, &c.src, 0.3).unwrap();
        // Independent: both pools as one, host slot h at fast_slots + h.
        let both = Tensor::cat(&[&c.fast, &c.host], 0).unwrap();
        let (pages, src) = (u32s(&c.list.pages), u32s(&c.src));
        let merged: Vec<u32> = (0..src.len())
            .flat_map(|e| {
                let slot = if src[e] == NONE {
                    pages[2 * e]
                } else {
                    sh.fast_slots as u32 + src[e]
                };
                [slot, pages[2 * e + 1]]
            })
            .collect();
        let list = PageList {
            pages: Tensor::from_vec(merged, c.list.pages.dims(), &Device::Cpu).unwrap(),
            ..c.list.clone()
        };
        let want = ops::sparse_paged_attention(&c.q, &both, &list, 0.3).unwrap();
        let what = format!("{dt:?} hq={hq} hkv={hkv} d={d} p={p}");
        assert_close(&got, &want, DType::F32, &what);
        assert_eq!(bits(&fast), bits(&filled(&c)), "{what}: the fast pool after the fills");
    }
}

#[test]
fn a_slot_filled_twice_or_read_while_filled_is_an_error() {
    let mut r = rng(3);
    let (q, host) = (randn(&mut r, &[1, 2, 8], 1.0), randn(&mut r, &[4, 2, 4, 8], 1.0));
    let fast = Tensor::zeros((4, 2, 4, 8), DType::F32, &Device::Cpu).unwrap();
    let list = |pages: Vec<u32>| PageList {
        pages: Tensor::from_vec(pages, (1, 1, 2, 2), &Device::Cpu).unwrap(),
        queries: Tensor::from_vec(vec![0u32, 7], (1, 2), &Device::Cpu).unwrap(),
        kv_limit: Tensor::from_vec(vec![8u32], 1, &Device::Cpu).unwrap(),
    };
    let src = |v: Vec<u32>| Tensor::from_vec(v, (1, 1, 2), &Device::Cpu).unwrap();
    // Slot 2 filled by both entries.
    let e = ops::tiered_paged_attention(&q, &fast, &host, &list(vec![2, 0, 2, 1]), &src(vec![0, 1]), 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tiered_paged_attention") && e.contains("filled by two entries"),
        "{e}"
    );
    // Slot 2 filled by entry 0 and read by entry 1.
    let e = ops::tiered_paged_attention(&q, &fast, &host, &list(vec![2, 0, 2, 1]), &src(vec![0, NONE]), 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("read by entry 1 and filled"), "{e}");
    // Shapes: src of the wrong shape, a host pool of another page size.
    let bad = Tensor::from_vec(vec![NONE; 3], (1, 1, 3), &Device::Cpu).unwrap();
    let e = ops::tiered_paged_attention(&q, &fast, &host, &list(vec![0, 0, 1, 1]), &bad, 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tiered_paged_attention") && e.contains("src") && e.contains("[1, 1, 3]"),
        "{e}"
    );
    let host5 = Tensor::zeros((4, 2, 5, 8), DType::F32, &Device::Cpu).unwrap();
    let e = ops::tiered_paged_attention(&q, &fast, &host5, &list(vec![0, 0, 1, 1]), &src(vec![NONE, NONE]), 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("host") && e.contains("[4, 2, 5, 8]"), "{e}");
    // Nothing was written by the failed calls.
    assert!(f32s(&fast).iter().all(|&x| x == 0.0));
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use spinkv::tiered::PinnedPagePool;

    fn on(dev: &Device, c: &Case) -> (Tensor, Tensor, Tensor, PageList, Tensor) {
        let m = |t: &Tensor| t.to_device(dev).unwrap();
        let list = PageList {
            pages: m(&c.list.pages),
            queries: m(&c.list.queries),
            kv_limit: m(&c.list.kv_limit),
        };
        (m(&c.q), m(&c.fast), m(&c.host), list, m(&c.src))
    }

    #[test]
    fn the_fused_kernel_matches_the_composition() {
        let Some(gpu) = cuda_or_skip("the_fused_kernel_matches_the_composition") else {
            return;
        };
        ops::set_poison_outputs(true);
        let mut r = rng(77);
        let mut cases = 0;
        for dt in [DType::BF16, DType::F16] {
            for (hq, hkv, d, p, n) in [
                (32, 8, 128, 16, 300),
                (8, 8, 64, 16, 3),
                (12, 1, 64, 5, 40),
                (16, 1, 128, 16, 9),
                (24, 2, 128, 5, 130),
            ] {
                let sh = Shape {
                    s: 4,
                    hq,
                    hkv,
                    d,
                    p,
                    n,
                    fast_slots: 4 * hkv * n + 11,
                    host_slots: 97,
                };
                let c = case(&mut r, &sh, dt);
                assert!(ops::tiered_attention_fused(&gpu, dt, d, hq, hkv));
                let cpu_fast = c.fast.copy().unwrap();
                let want = ops::tiered_paged_attention(&c.q, &cpu_fast, &c.host, &c.list, &c.src, 0.09).unwrap();
                let what = format!("{dt:?} hq={hq} hkv={hkv} d={d} p={p} n={n}");
                // Tensor host pool on the GPU.
                let (q, fast, host, list, src) = on(&gpu, &c);
                let got = ops::tiered_paged_attention(&q, &fast, &host, &list, &src, 0.09).unwrap();
                assert_close(&got, &want, dt, &what);
                assert_eq!(bits(&fast), bits(&cpu_fast), "{what}: fills into a GPU pool");
                // The pinned host tier.
                let mut pinned = PinnedPagePool::new(&gpu, sh.host_slots, p, d, dt).unwrap();
                let all: Vec<u32> = (0..sh.host_slots as u32).collect();
                pinned.write_pages(&all, &c.host).unwrap();
                let fast2 = c.fast.to_device(&gpu).unwrap();
                let got = pinned.attend_tiered(&q, &fast2, &list, &src, 0.09).unwrap();
                assert_close(&got, &want, dt, &format!("{what}, pinned"));
                assert_eq!(bits(&fast2), bits(&cpu_fast), "{what}: fills from pinned memory");
                cases += 1;
            }
        }
        assert_eq!(cases, 10);
    }

    #[test]
    fn the_pinned_tier_refuses_shapes_without_a_fused_kernel() {
        let Some(gpu) = cuda_or_skip("the_pinned_tier_refuses_shapes_without_a_fused_kernel") else {
            return;
        };
        let mut r = rng(5);
        let sh = Shape {
            s: 2,
            hq: 4,
            hkv: 2,
            d: 32,
            p: 16,
            n: 4,
            fast_slots: 20,
            host_slots: 9,
        };
        let c = case(&mut r, &sh, DType::F32);
        assert!(!ops::tiered_attention_fused(&gpu, DType::F32, 32, 4, 2));
        let (q, fast, _, list, src) = on(&gpu, &c);
        let pinned = PinnedPagePool::new(&gpu, 9, 16, 32, DType::F32).unwrap();
        let e = pinned
            .attend_tiered(&q, &fast, &list, &src, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("attend_tiered") && e.contains("no fused kernel"), "{e}");
    }
}
