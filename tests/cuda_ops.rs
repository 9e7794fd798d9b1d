//! Every CUDA kernel against the CPU op (the reference) on random inputs: odd sizes,
//! partial pages, GQA 3:1 (and 1, 4, 8, 12, 16, 24), empty selections, NONE padding,
//! budgets over the context, splits along long page lists, all three dtypes. Outputs
//! the ops allocate are poisoned (NaN / NONE) before each kernel runs
//! (`spinkv::ops::set_poison_outputs`); in-place targets start as random garbage.
//!
//! Tolerances: copies, append, min/max metadata and top-k must be bit-exact; Quest
//! scores within 1e-5·(1 + |x|) (f32 summation order); attention output within 1e-4
//! (f32), 4e-3 (f16), 1.5e-2 (bf16) absolute — the tensor-core path rounds the softmax
//! weights to the storage type as FlashAttention does — and lse within 1e-3.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use rand::seq::SliceRandom;
use rand::Rng;
use spinkv::ops::{self, PageList, EMPTY_LSE, NONE};

fn gpu() -> Device {
    spinkv::ops::set_poison_outputs(true);
    Device::new_cuda(0).expect("a CUDA device")
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Destinations `[T, H]` of `t` tokens per head continuing a sequence at `start`, each
/// (head, page) in its own random slot; about 1 in 9 entries NONE.
fn destinations(r: &mut rand::rngs::StdRng, t: usize, h: usize, p: usize, slots: usize, start: usize) -> Vec<u32> {
    let mut free: Vec<u32> = (0..slots as u32).collect();
    free.shuffle(r);
    let pages = (start + t).div_ceil(p);
    let table: Vec<Vec<u32>> = (0..h)
        .map(|_| (0..pages).map(|_| free.pop().unwrap()).collect())
        .collect();
    let mut dst = vec![NONE; t * h];
    for ti in 0..t {
        for hi in 0..h {
            if r.random_range(0..9) == 0 {
                continue;
            }
            let pos = start + ti;
            dst[ti * h + hi] = table[hi][pos / p] * p as u32 + (pos % p) as u32;
        }
    }
    dst
}

#[test]
fn paged_append_matches_cpu_bit_exactly() {
    let dev = gpu();
    let mut r = rng(11);
    for dt in DTYPES {
        for &(d, p, t, h) in &[
            (128usize, 16usize, 37usize, 3usize),
            (64, 8, 5, 8),
            (36, 16, 70, 2),
            (35, 32, 9, 1),
            (128, 16, 1, 8),
        ] {
            let slots = (t + 40).div_ceil(p) * h + 7;
            let pool = randn(&mut r, &[slots, 2, p, d], 3.0).to_dtype(dt).unwrap();
            let k = randn(&mut r, &[t, h, d], 1.0).to_dtype(dt).unwrap();
            let v = randn(&mut r, &[t, h, d], 1.0).to_dtype(dt).unwrap();
            let start = r.random_range(0..40);
            let dst = destinations(&mut r, t, h, p, slots, start);
            let dst_c = Tensor::from_vec(dst.clone(), (t, h), &Device::Cpu).unwrap();
            let pool_g = pool.to_device(&dev).unwrap();
            ops::paged_append(&pool, &k, &v, &dst_c).unwrap();
            ops::paged_append(
                &pool_g,
                &k.to_device(&dev).unwrap(),
                &v.to_device(&dev).unwrap(),
                &dst_c.to_device(&dev).unwrap(),
            )
            .unwrap();
            assert_eq!(
                bits(&pool),
                bits(&pool_g),
                "paged_append {dt:?} d={d} p={p} t={t} h={h}"
            );
        }
    }
}

#[test]
fn quest_meta_update_matches_cpu_bit_exactly() {
    let dev = gpu();
    let mut r = rng(12);
    for dt in DTYPES {
        for &(d, p, t, h) in &[
            (128usize, 16usize, 37usize, 3usize),
            (64, 8, 50, 8),
            (40, 16, 1, 2),
            (33, 32, 100, 1),
        ] {
            let slots = (t + 40).div_ceil(p) * h + 3;
            let meta = randn(&mut r, &[slots, 2, d], 2.0).to_dtype(dt).unwrap();
            let meta_g = meta.to_device(&dev).unwrap();
            // Two calls: a prefill-like chunk, then decode-like single tokens.
            let start = r.random_range(0..40);
            for (s0, n) in [(start, t), (start + t, 1), (start + t + 1, 1)] {
                let k = randn(&mut r, &[n, h, d], 1.0).to_dtype(dt).unwrap();
                let dst = destinations(&mut r, n, h, p, slots, s0);
                let dst_c = Tensor::from_vec(dst, (n, h), &Device::Cpu).unwrap();
                ops::quest_meta_update(&meta, &k, &dst_c, p).unwrap();
                ops::quest_meta_update(&meta_g, &k.to_device(&dev).unwrap(), &dst_c.to_device(&dev).unwrap(), p)
                    .unwrap();
                assert_eq!(
                    bits(&meta),
                    bits(&meta_g),
                    "quest_meta_update {dt:?} d={d} p={p} t={n} h={h}"
                );
            }
        }
    }
}

#[test]
fn paged_append_with_minmax_matches_cpu_bit_exactly() {
    // The cache's use: metadata (host slots) for every token, write-through into a smaller
    // pool (fast-tier slots) only for resident pages, NONE rows in both. Odd head dims
    // take the 4- and 2-byte copy paths.
    let dev = gpu();
    let mut r = rng(16);
    let (mut meta_only, mut both) = (0, 0);
    for dt in DTYPES {
        for &(d, p, t, h) in &[
            (128usize, 16usize, 37usize, 3usize),
            (64, 8, 50, 8),
            (35, 16, 70, 2),
            (33, 32, 9, 1),
            (128, 16, 1, 8),
        ] {
            let meta_slots = (t + 40).div_ceil(p) * h + 3;
            let pool_slots = meta_slots / 2 + 1;
            let meta = randn(&mut r, &[meta_slots, 2, d], 2.0).to_dtype(dt).unwrap();
            let pool = randn(&mut r, &[pool_slots, 2, p, d], 3.0).to_dtype(dt).unwrap();
            let (meta_g, pool_g) = (meta.to_device(&dev).unwrap(), pool.to_device(&dev).unwrap());
            // Resident pages: a random host slot → fast slot map over about half the slots.
            let mut fast: Vec<u32> = (0..pool_slots as u32).collect();
            fast.shuffle(&mut r);
            let resident: Vec<u32> = (0..meta_slots)
                .map(|_| {
                    if r.random_range(0..2) == 0 {
                        fast.pop().unwrap_or(NONE)
                    } else {
                        NONE
                    }
                })
                .collect();
            let start = r.random_range(0..40);
            for (s0, n) in [(start, t), (start + t, 1), (start + t + 1, 1)] {
                let k = randn(&mut r, &[n, h, d], 1.0).to_dtype(dt).unwrap();
                let v = randn(&mut r, &[n, h, d], 1.0).to_dtype(dt).unwrap();
                let meta_dst = destinations(&mut r, n, h, p, meta_slots, s0);
                let pool_dst: Vec<u32> = meta_dst
                    .iter()
                    .map(|&c| match c {
                        NONE => NONE,
                        c => match resident[c as usize / p] {
                            NONE => NONE,
                            f => f * p as u32 + c % p as u32,
                        },
                    })
                    .collect();
                for (m, f) in meta_dst.iter().zip(&pool_dst) {
                    meta_only += (*m != NONE && *f == NONE) as usize;
                    both += (*f != NONE) as usize;
                }
                let meta_dst = Tensor::from_vec(meta_dst, (n, h), &Device::Cpu).unwrap();
                let pool_dst = Tensor::from_vec(pool_dst, (n, h), &Device::Cpu).unwrap();
                ops::paged_append_with_minmax(&pool, &k, &v, &pool_dst, &meta, &meta_dst).unwrap();
                let g = |x: &Tensor| x.to_device(&dev).unwrap();
                ops::paged_append_with_minmax(&pool_g, &g(&k), &g(&v), &g(&pool_dst), &meta_g, &g(&meta_dst)).unwrap();
                let what = format!("paged_append_with_minmax {dt:?} d={d} p={p} t={n} h={h}");
                assert_eq!(bits(&pool), bits(&pool_g), "pool: {what}");
                assert_eq!(bits(&meta), bits(&meta_g), "meta: {what}");
            }
        }
    }
    assert!(meta_only > 0 && both > 0, "cases cover both kinds of rows");
    // The metadata may not alias an operand the kernel also touches.
    let pool = Tensor::zeros((4, 2, 16, 8), DType::F32, &dev).unwrap();
    let k = Tensor::zeros((2, 1, 8), DType::F32, &dev).unwrap();
    let dst = Tensor::from_vec(vec![0u32, 1], (2, 1), &dev).unwrap();
    let aliased = pool
        .flatten_all()
        .unwrap()
        .narrow(0, 0, 4 * 2 * 8)
        .unwrap()
        .reshape((4, 2, 8))
        .unwrap();
    let err = ops::paged_append_with_minmax(&pool, &k, &k.clone(), &dst, &aliased, &dst).expect_err("aliased meta");
    assert!(err.to_string().contains("shares a device buffer"), "{err}");
}

#[test]
fn quest_page_scores_match_cpu() {
    let dev = gpu();
    let mut r = rng(13);
    for dt in DTYPES {
        for &(hq, hkv, d) in &[
            (3, 1, 64),
            (32, 8, 128),
            (16, 2, 128),
            (24, 2, 64),
            (4, 4, 40),
            (6, 2, 96),
        ] {
            for &(sink, window) in &[(0, 0), (1, 2), (2, 0), (0, 5)] {
                let (b, n, slots) = (3, 131, 500);
                let q = randn(&mut r, &[b, hq, d], 1.0).to_dtype(dt).unwrap();
                let a = randn(&mut r, &[slots, 1, d], 1.0);
                let c = randn(&mut r, &[slots, 1, d], 1.0);
                let meta = Tensor::cat(&[a.minimum(&c).unwrap(), a.maximum(&c).unwrap()], 1)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                // Row lengths: full, empty, one, random; NONE padding at the end.
                let mut cand = vec![NONE; b * hkv * n];
                for row in 0..b * hkv {
                    let valid = match row % 4 {
                        0 => n,
                        1 => 0,
                        2 => 1,
                        _ => r.random_range(0..n),
                    };
                    for j in 0..valid {
                        cand[row * n + j] = r.random_range(0..slots as u32);
                    }
                }
                let cand_c = Tensor::from_vec(cand, (b, hkv, n), &Device::Cpu).unwrap();
                let want = f32s(&ops::quest_page_scores(&q, &meta, &cand_c, sink, window).unwrap());
                let got = ops::quest_page_scores(
                    &q.to_device(&dev).unwrap(),
                    &meta.to_device(&dev).unwrap(),
                    &cand_c.to_device(&dev).unwrap(),
                    sink,
                    window,
                )
                .unwrap();
                let got = f32s(&got);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let ok = if w.is_infinite() {
                        g == w
                    } else {
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs())
                    };
                    assert!(ok, "quest scores {dt:?} hq={hq} hkv={hkv} d={d} sink={sink} window={window}: [{i}] gpu {g} cpu {w}");
                }
            }
        }
    }
}

#[test]
fn topk_matches_cpu_exactly() {
    let dev = gpu();
    let mut r = rng(14);
    for &(rows, n) in &[(1, 1), (3, 7), (5, 100), (64, 2048), (2, 5000), (7, 8193), (2, 70_000)] {
        for &k in &[1usize, 5, 128, 300, n + 10] {
            let mut s = Vec::with_capacity(rows * n);
            for _ in 0..rows * n {
                let x = match r.random_range(0..20) {
                    0 => f32::NEG_INFINITY,
                    1 => f32::INFINITY,
                    2 => f32::NAN,
                    3 => -0.0,
                    4 => 0.0,
                    // Coarse values: many ties.
                    5..=9 => (r.random_range(-8..8) as f32) * 0.5,
                    _ => r.random::<f32>() * 20.0 - 10.0,
                };
                s.push(x);
            }
            let sc = Tensor::from_vec(s, (rows, n), &Device::Cpu).unwrap();
            let want = u32s(&ops::topk_indices(&sc, k).unwrap());
            let got = u32s(&ops::topk_indices(&sc.to_device(&dev).unwrap(), k).unwrap());
            assert_eq!(got, want, "topk rows={rows} n={n} k={k}");
        }
    }
    // More than the GPU sort holds: the CPU fallback, same answer.
    let sc = randn(&mut r, &[2, 20_000], 1.0);
    let want = u32s(&ops::topk_indices(&sc, 20_000).unwrap());
    let got = u32s(&ops::topk_indices(&sc.to_device(&dev).unwrap(), 20_000).unwrap());
    assert_eq!(got, want, "topk CPU fallback");
}

#[test]
fn copy_pages_and_selection_to_pages_match_cpu() {
    let dev = gpu();
    let mut r = rng(15);
    for dt in DTYPES {
        for &(p, d, n) in &[(16, 128, 37), (8, 35, 5), (32, 64, 1)] {
            let (nd, ns) = (60, 80);
            let dst = randn(&mut r, &[nd, 2, p, d], 1.0).to_dtype(dt).unwrap();
            let src = randn(&mut r, &[ns, 2, p, d], 1.0).to_dtype(dt).unwrap();
            let mut dsts: Vec<u32> = (0..nd as u32).collect();
            dsts.shuffle(&mut r);
            let pairs: Vec<u32> = (0..n).flat_map(|i| [r.random_range(0..ns as u32), dsts[i]]).collect();
            let pairs = Tensor::from_vec(pairs, (n, 2), &Device::Cpu).unwrap();
            let dst_g = dst.to_device(&dev).unwrap();
            ops::copy_pages(&dst, &src, &pairs).unwrap();
            ops::copy_pages(&dst_g, &src.to_device(&dev).unwrap(), &pairs.to_device(&dev).unwrap()).unwrap();
            assert_eq!(bits(&dst), bits(&dst_g), "copy_pages {dt:?} p={p} d={d} n={n}");
        }
    }
    let (b, h, n, k) = (3, 2, 50, 9);
    let mut cand = vec![NONE; b * h * n];
    for (i, c) in cand.iter_mut().enumerate() {
        if i % n < 40 {
            *c = r.random_range(0..1000);
        }
    }
    let sel: Vec<u32> = (0..b * h * k)
        .map(|i| if i % 4 == 3 { NONE } else { r.random_range(0..45) })
        .collect();
    let cand = Tensor::from_vec(cand, (b, h, n), &Device::Cpu).unwrap();
    let sel = Tensor::from_vec(sel, (b, h, k), &Device::Cpu).unwrap();
    let want = u32s(&spinkv::ops::selection_to_pages(&cand, &sel).unwrap());
    let got =
        u32s(&spinkv::ops::selection_to_pages(&cand.to_device(&dev).unwrap(), &sel.to_device(&dev).unwrap()).unwrap());
    assert_eq!(got, want, "selection_to_pages");
}

/// One attention case: `lens[s]` tokens per sequence in a shuffled pool, page lists of
/// `frac` of each sequence's pages (in random order, NONE padding, some NONE holes), one
/// empty list, decode queries plus causal earlier positions.
struct AttnCase {
    dt: DType,
    hq: usize,
    hkv: usize,
    d: usize,
    p: usize,
    lens: Vec<usize>,
    frac: f64,
    extra_queries: usize,
}

fn run_attention_case(dev: &Device, r: &mut rand::rngs::StdRng, c: &AttnCase) {
    let AttnCase {
        dt,
        hq,
        hkv,
        d,
        p,
        ref lens,
        frac,
        extra_queries,
    } = *c;
    let s = lens.len();
    let npages: Vec<usize> = lens.iter().map(|l| l.div_ceil(p)).collect();
    let slots = npages.iter().sum::<usize>() * hkv + 5;
    let pool = randn(r, &[slots, 2, p, d], 1.0).to_dtype(dt).unwrap();
    let mut free: Vec<u32> = (0..slots as u32).collect();
    free.shuffle(r);
    let lists: Vec<Vec<Vec<(u32, u32)>>> = (0..s)
        .map(|si| {
            (0..hkv)
                .map(|h| {
                    let table: Vec<u32> = (0..npages[si]).map(|_| free.pop().unwrap()).collect();
                    if si == 0 && h == hkv - 1 && s > 1 {
                        return Vec::new(); // an empty selection
                    }
                    let mut order: Vec<usize> = (0..npages[si]).collect();
                    order.shuffle(r);
                    let keep = ((npages[si] as f64 * frac).ceil() as usize).clamp(1, npages[si]);
                    let mut l: Vec<(u32, u32)> = order[..keep].iter().map(|&lp| (table[lp], lp as u32)).collect();
                    if l.len() > 3 {
                        l.insert(2, (NONE, 0)); // a hole
                    }
                    l
                })
                .collect()
        })
        .collect();
    let n = lists.iter().flatten().map(|l| l.len()).max().unwrap_or(0) + 2;
    let mut pages = vec![NONE; s * hkv * n * 2];
    for si in 0..s {
        for h in 0..hkv {
            for (j, &(slot, lp)) in lists[si][h].iter().enumerate() {
                pages[((si * hkv + h) * n + j) * 2] = slot;
                pages[((si * hkv + h) * n + j) * 2 + 1] = lp;
            }
        }
    }
    let mut queries = Vec::new();
    for (si, &l) in lens.iter().enumerate() {
        queries.push([si as u32, (l - 1) as u32]);
        for _ in 0..extra_queries {
            queries.push([si as u32, r.random_range(0..l as u32)]);
        }
    }
    // A token whose sequence limit hides everything: empty row.
    let kv_limit: Vec<u32> = lens
        .iter()
        .enumerate()
        .map(|(si, &l)| if si == s - 1 && s > 2 { 0 } else { l as u32 })
        .collect();
    let t = queries.len();
    let q = randn(r, &[t, hq, d], 1.0).to_dtype(dt).unwrap();
    let list_c = PageList {
        pages: Tensor::from_vec(pages, (s, hkv, n, 2), &Device::Cpu).unwrap(),
        queries: Tensor::from_vec(queries.concat(), (t, 2), &Device::Cpu).unwrap(),
        kv_limit: Tensor::from_vec(kv_limit, s, &Device::Cpu).unwrap(),
    };
    let list_g = PageList {
        pages: list_c.pages.to_device(dev).unwrap(),
        queries: list_c.queries.to_device(dev).unwrap(),
        kv_limit: list_c.kv_limit.to_device(dev).unwrap(),
    };
    let scale = 1.0 / (d as f32).sqrt();
    let want = ops::sparse_paged_attention(&q, &pool, &list_c, scale).unwrap();
    let got = ops::sparse_paged_attention(
        &q.to_device(dev).unwrap(),
        &pool.to_device(dev).unwrap(),
        &list_g,
        scale,
    )
    .unwrap();
    let tol = match dt {
        DType::F32 => 1e-4,
        DType::F16 => 4e-3,
        _ => 1.5e-2,
    };
    let (go, wo) = (f32s(&got.out), f32s(&want.out));
    let (gl, wl) = (f32s(&got.lse), f32s(&want.lse));
    let what = format!("attention {dt:?} hq={hq} hkv={hkv} d={d} p={p} lens={lens:?} frac={frac} t={t} n={n}");
    for (i, (g, w)) in go.iter().zip(&wo).enumerate() {
        assert!((g - w).abs() <= tol, "{what}: out[{i}] gpu {g} cpu {w}");
    }
    for (i, (g, w)) in gl.iter().zip(&wl).enumerate() {
        if *w == EMPTY_LSE {
            assert_eq!(*g, EMPTY_LSE, "{what}: lse[{i}] should be empty");
        } else {
            assert!(
                (g - w).abs() <= 1e-3 * (1.0 + w.abs()),
                "{what}: lse[{i}] gpu {g} cpu {w}"
            );
        }
    }
}

#[test]
fn sparse_paged_attention_matches_cpu() {
    let dev = gpu();
    let mut r = rng(16);
    for dt in DTYPES {
        for &(hq, hkv, d) in &[
            (3, 1, 128),
            (32, 8, 128),
            (16, 2, 64),
            (12, 4, 64),
            (8, 8, 128),
            (12, 1, 128),
            (16, 1, 64),
            (24, 1, 64),
            (6, 2, 80),
        ] {
            for &p in &[16, 8, 32] {
                for &frac in &[0.3, 1.0] {
                    let lens = vec![p * 5 + 3, 1, 2 * p, 77];
                    let c = AttnCase {
                        dt,
                        hq,
                        hkv,
                        d,
                        p,
                        lens,
                        frac,
                        extra_queries: 2,
                    };
                    run_attention_case(&dev, &mut r, &c);
                }
            }
        }
    }
}

#[test]
fn sparse_paged_attention_long_lists_split_and_merge() {
    let dev = gpu();
    let mut r = rng(17);
    // Both kernel variants (8- or 16-row GQA tiles) and split factors; the knobs are
    // process-wide, and every variant must be correct whichever runs.
    for (g8, waves) in [(true, 1), (false, 1), (true, 3)] {
        spinkv::ops::set_attention_g8(g8);
        spinkv::ops::set_attention_waves(waves);
        for dt in [DType::BF16, DType::F16] {
            for &(hq, hkv, d) in &[(32, 8, 128), (3, 1, 64), (16, 2, 128), (12, 1, 128)] {
                // Long lists with few (token, head) units: many splits and the merge kernel.
                let c = AttnCase {
                    dt,
                    hq,
                    hkv,
                    d,
                    p: 16,
                    lens: vec![16 * 600 + 5],
                    frac: 1.0,
                    extra_queries: 0,
                };
                run_attention_case(&dev, &mut r, &c);
                let c = AttnCase {
                    dt,
                    hq,
                    hkv,
                    d,
                    p: 16,
                    lens: vec![16 * 300 + 9, 4000],
                    frac: 0.4,
                    extra_queries: 1,
                };
                run_attention_case(&dev, &mut r, &c);
                // Many tokens: one split each.
                let c = AttnCase {
                    dt,
                    hq,
                    hkv,
                    d,
                    p: 16,
                    lens: vec![300, 200, 64],
                    frac: 0.5,
                    extra_queries: 120,
                };
                run_attention_case(&dev, &mut r, &c);
                let c = AttnCase {
                    dt,
                    hq,
                    hkv,
                    d,
                    p: 32,
                    lens: vec![32 * 40 + 17, 9],
                    frac: 0.7,
                    extra_queries: 3,
                };
                run_attention_case(&dev, &mut r, &c);
            }
        }
    }
    spinkv::ops::set_attention_g8(true);
    spinkv::ops::set_attention_waves(1);
}

/// The fused merge kernel against the CPU op: random states of odd sizes, rows where a
/// side attended nothing; outputs poisoned first. Within 1e-5 relative (exp/log ulps).
#[test]
fn merge_partials_matches_cpu() {
    let dev = gpu();
    let mut r = rng(21);
    for &(t, h, d) in &[(1, 1, 1), (5, 9, 64), (33, 3, 128)] {
        let rows = t * h;
        let mut part = |empty: usize| {
            let lse: Vec<f32> = (0..rows)
                .map(|i| {
                    if i % 3 == empty {
                        EMPTY_LSE
                    } else {
                        r.random_range(-30.0f32..30.0)
                    }
                })
                .collect();
            ops::AttentionPartial {
                out: randn(&mut r, &[t, h, d], 1.0),
                lse: Tensor::from_vec(lse, (t, h), &Device::Cpu).unwrap(),
            }
        };
        let (a, b) = (part(0), part(1));
        let want = ops::merge_partials(&a, &b).unwrap();
        let on = |p: &ops::AttentionPartial| ops::AttentionPartial {
            out: p.out.to_device(&dev).unwrap(),
            lse: p.lse.to_device(&dev).unwrap(),
        };
        let got = ops::merge_partials(&on(&a), &on(&b)).unwrap();
        for (g, w) in [(&got.out, &want.out), (&got.lse, &want.lse)] {
            let g = g
                .to_device(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (i, (x, y)) in g.iter().zip(&w).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "({t}, {h}, {d}) element {i}: {x} vs {y}"
                );
            }
        }
    }
}
