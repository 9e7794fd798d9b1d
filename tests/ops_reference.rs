//! Each op against a plain reference on random inputs (shuffled page slots, partial last
//! pages, GQA 3:1, empty lists), f32 within 1e-5 unless stated.

#![allow(
    clippy::needless_range_loop,
    clippy::explicit_counter_loop,
    clippy::too_many_arguments
)]

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use rand::seq::SliceRandom;
use rand::Rng;
use spinkv::ops::{self, PageList, NONE};

/// Scatters `k`/`v` `[L, Hkv, D]` of one sequence into shuffled slots of a pool; returns
/// (pool, per-head slot of each logical page).
fn scatter(k: &Tensor, v: &Tensor, page: usize, slots: usize, r: &mut rand::rngs::StdRng) -> (Tensor, Vec<Vec<u32>>) {
    let (l, hkv, d) = k.dims3().unwrap();
    let pool = randn(r, &[slots, 2, page, d], 9.0); // garbage everywhere (poison)
    let mut free: Vec<u32> = (0..slots as u32).collect();
    free.shuffle(r);
    let npages = l.div_ceil(page);
    let mut table = vec![vec![0u32; npages]; hkv];
    let mut dst = vec![NONE; l * hkv];
    for h in 0..hkv {
        for p in 0..npages {
            table[h][p] = free.pop().unwrap();
        }
        for t in 0..l {
            dst[t * hkv + h] = table[h][t / page] * page as u32 + (t % page) as u32;
        }
    }
    let dst = Tensor::from_vec(dst, (l, hkv), &Device::Cpu).unwrap();
    ops::paged_append(&pool, k, v, &dst).unwrap();
    (pool, table)
}

#[test]
fn paged_attention_matches_reference_on_random_layouts() {
    let mut r = rng(1);
    for &(hq, hkv, d, page, l) in &[
        (3, 1, 64, 16, 37),
        (6, 2, 128, 8, 100),
        (8, 2, 64, 32, 33),
        (4, 4, 64, 16, 16),
    ] {
        let k = randn(&mut r, &[l, hkv, d], 1.0);
        let v = randn(&mut r, &[l, hkv, d], 1.0);
        let (pool, table) = scatter(&k, &v, page, l.div_ceil(page) * hkv + 5, &mut r);
        let npages = l.div_ceil(page);
        // Queries at a few positions (decode-like: the last, and causal earlier ones).
        let qpos = [l - 1, l / 2, 0];
        let t = qpos.len();
        let q = randn(&mut r, &[t, hq, d], 1.0);
        let mut pages = vec![NONE; hkv * (npages + 2) * 2];
        for h in 0..hkv {
            // Page lists in random order, padded with NONE in the middle of nothing.
            let mut order: Vec<usize> = (0..npages).collect();
            order.shuffle(&mut r);
            for (j, &p) in order.iter().enumerate() {
                pages[(h * (npages + 2) + j) * 2] = table[h][p];
                pages[(h * (npages + 2) + j) * 2 + 1] = p as u32;
            }
        }
        let queries: Vec<u32> = qpos.iter().flat_map(|&p| [0u32, p as u32]).collect();
        let list = PageList {
            pages: Tensor::from_vec(pages, (1, hkv, npages + 2, 2), &Device::Cpu).unwrap(),
            queries: Tensor::from_vec(queries, (t, 2), &Device::Cpu).unwrap(),
            kv_limit: Tensor::new(&[l as u32], &Device::Cpu).unwrap(),
        };
        let scale = 1.0 / (d as f32).sqrt();
        let got = ops::sparse_paged_attention(&q, &pool, &list, scale).unwrap();
        let want = ops::reference_attention(&q, &k, &v, &qpos, scale as f64).unwrap();
        let err = max_abs_diff(&got.out, &want);
        assert!(err < 1e-5, "hq={hq} hkv={hkv} d={d} page={page} l={l}: err {err}");
    }
}

#[test]
fn paged_attention_empty_list_gives_empty_state_and_merge_is_exact() {
    let mut r = rng(2);
    let (hq, hkv, d, page, l) = (6, 2, 64, 16, 50);
    let k = randn(&mut r, &[l, hkv, d], 1.0);
    let v = randn(&mut r, &[l, hkv, d], 1.0);
    let (pool, table) = scatter(&k, &v, page, 20, &mut r);
    let q = randn(&mut r, &[1, hq, d], 1.0);
    let npages = l.div_ceil(page);
    let mk = |which: &dyn Fn(usize) -> bool| {
        let mut pages = vec![NONE; hkv * npages * 2];
        for h in 0..hkv {
            let mut j = 0;
            for p in (0..npages).filter(|&p| which(p)) {
                pages[(h * npages + j) * 2] = table[h][p];
                pages[(h * npages + j) * 2 + 1] = p as u32;
                j += 1;
            }
        }
        PageList {
            pages: Tensor::from_vec(pages, (1, hkv, npages, 2), &Device::Cpu).unwrap(),
            queries: Tensor::new(&[[0u32, (l - 1) as u32]], &Device::Cpu).unwrap(),
            kv_limit: Tensor::new(&[l as u32], &Device::Cpu).unwrap(),
        }
    };
    let empty = ops::sparse_paged_attention(&q, &pool, &mk(&|_| false), 0.125).unwrap();
    assert_eq!(
        empty.out.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(),
        0.0
    );
    assert!(empty
        .lse
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|&x| x == ops::EMPTY_LSE));
    let a = ops::sparse_paged_attention(&q, &pool, &mk(&|p| p % 2 == 0), 0.125).unwrap();
    let b = ops::sparse_paged_attention(&q, &pool, &mk(&|p| p % 2 == 1), 0.125).unwrap();
    let all = ops::sparse_paged_attention(&q, &pool, &mk(&|_| true), 0.125).unwrap();
    let merged = ops::merge_partials(&ops::merge_partials(&a, &b).unwrap(), &empty).unwrap();
    assert!(max_abs_diff(&merged.out, &all.out) < 1e-6);
    assert!(max_abs_diff(&merged.lse, &all.lse) < 1e-5);
}

#[test]
fn causal_self_attention_matches_reference() {
    let mut r = rng(3);
    for &(hq, hkv, n) in &[(9, 3, 700), (4, 4, 5)] {
        let q = randn(&mut r, &[n, hq, 64], 1.0);
        let k = randn(&mut r, &[n, hkv, 64], 1.0);
        let v = randn(&mut r, &[n, hkv, 64], 1.0);
        let got = ops::causal_self_attention(&q, &k, &v, 0.125).unwrap();
        let want = ops::reference_attention(&q, &k, &v, &(0..n).collect::<Vec<_>>(), 0.125).unwrap();
        let err = max_abs_diff(&got.out, &want);
        assert!(err < 1e-5, "n={n}: err {err}");
    }
}

#[test]
fn quest_scores_match_plain_formula() {
    let mut r = rng(4);
    let (b, hq, hkv, d, slots, n) = (2, 6, 2, 64, 30, 11);
    let q = randn(&mut r, &[b, hq, d], 1.0);
    let meta = randn(&mut r, &[slots, 2, d], 1.0);
    let mut cand = vec![NONE; b * hkv * n];
    for (i, c) in cand.iter_mut().enumerate() {
        if i % n < n - 2 {
            *c = r.random_range(0..slots as u32);
        }
    }
    let candt = Tensor::from_vec(cand.clone(), (b, hkv, n), &Device::Cpu).unwrap();
    let got = ops::quest_page_scores(&q, &meta, &candt, 1, 2)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let qv = q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mv = meta.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for bi in 0..b {
        for h in 0..hkv {
            for j in 0..n {
                let g = got[(bi * hkv + h) * n + j];
                let c = cand[(bi * hkv + h) * n + j];
                let valid = n - 2;
                if c == NONE {
                    assert_eq!(g, f32::NEG_INFINITY);
                } else if j < 1 || j + 2 >= valid {
                    assert_eq!(g, f32::INFINITY, "sink/window forced");
                } else {
                    let mut best = f64::NEG_INFINITY;
                    for qi in 0..hq / hkv {
                        let qh = &qv[(bi * hq + h * (hq / hkv) + qi) * d..][..d];
                        let s: f64 = (0..d)
                            .map(|x| {
                                let (mn, mx) =
                                    (mv[c as usize * 2 * d + x] as f64, mv[c as usize * 2 * d + d + x] as f64);
                                (qh[x] as f64 * mn).max(qh[x] as f64 * mx)
                            })
                            .sum();
                        best = best.max(s);
                    }
                    assert!((g as f64 - best).abs() < 1e-4, "score {g} vs {best}");
                }
            }
        }
    }
}

#[test]
fn quest_meta_update_tracks_min_max_and_resets_fresh_pages() {
    let mut r = rng(5);
    let (page, d) = (8, 16);
    let meta = randn(&mut r, &[3, 2, d], 50.0); // stale garbage must be reset at row 0
    let k = randn(&mut r, &[20, 1, d], 1.0);
    let dst: Vec<u32> = (0..20u32)
        .map(|t| (t / page as u32) * page as u32 + t % page as u32)
        .collect();
    ops::quest_meta_update(&meta, &k, &Tensor::from_vec(dst, (20, 1), &Device::Cpu).unwrap(), page).unwrap();
    for p in 0..3 {
        let rows = k
            .narrow(0, p * page, (20 - p * page).min(page))
            .unwrap()
            .squeeze(1)
            .unwrap();
        let mn = rows.min(0).unwrap();
        let mx = rows.max(0).unwrap();
        assert!(max_abs_diff(&meta.get(p).unwrap().get(0).unwrap(), &mn) == 0.0);
        assert!(max_abs_diff(&meta.get(p).unwrap().get(1).unwrap(), &mx) == 0.0);
    }
}

#[test]
fn paged_append_with_minmax_matches_plain_reference() {
    // Two tiers as the cache uses them: the metadata (keyed by "host" slot) sees every
    // token, the pool (a "fast tier" with its own slots) only the resident pages' tokens.
    let mut r = rng(15);
    for &(h, d, page, prefill) in &[(2usize, 16usize, 8usize, 21usize), (3, 6, 4, 9), (1, 32, 16, 16)] {
        let steps = [prefill, 1, 1, 1];
        let total: usize = steps.iter().sum();
        let npages = total.div_ceil(page);
        let meta_slots = npages * h + 3;
        let pool_slots = npages * h + 2;
        let mut host: Vec<u32> = (0..meta_slots as u32).collect();
        let mut fast: Vec<u32> = (0..pool_slots as u32).collect();
        host.shuffle(&mut r);
        fast.shuffle(&mut r);
        // Per (head, logical page): host slot, and fast slot for about half the pages.
        let host_of: Vec<Vec<u32>> = (0..h)
            .map(|_| (0..npages).map(|_| host.pop().unwrap()).collect())
            .collect();
        let fast_of: Vec<Vec<u32>> = (0..h)
            .map(|_| {
                (0..npages)
                    .map(|_| {
                        if r.random_range(0..2) == 0 {
                            NONE
                        } else {
                            fast.pop().unwrap()
                        }
                    })
                    .collect()
            })
            .collect();
        let pool = randn(&mut r, &[pool_slots, 2, page, d], 9.0); // garbage
        let meta = randn(&mut r, &[meta_slots, 2, d], 9.0); // stale bounds
        let mut want_pool = pool.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut want_meta = meta.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut pos = 0;
        for &n in &steps {
            let k = randn(&mut r, &[n, h, d], 1.0);
            let v = randn(&mut r, &[n, h, d], 1.0);
            let (kv, vv) = (
                k.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let mut pool_dst = vec![NONE; n * h];
            let mut meta_dst = vec![NONE; n * h];
            for t in 0..n {
                let (lp, row) = ((pos + t) / page, (pos + t) % page);
                for hi in 0..h {
                    let e = t * h + hi;
                    let key = &kv[e * d..(e + 1) * d];
                    let hs = host_of[hi][lp] as usize;
                    meta_dst[e] = (hs * page + row) as u32;
                    let (mn, mx) = want_meta[hs * 2 * d..(hs + 1) * 2 * d].split_at_mut(d);
                    for j in 0..d {
                        mn[j] = if row == 0 { key[j] } else { mn[j].min(key[j]) };
                        mx[j] = if row == 0 { key[j] } else { mx[j].max(key[j]) };
                    }
                    let fs = fast_of[hi][lp];
                    if fs != NONE {
                        let fs = fs as usize;
                        pool_dst[e] = (fs * page + row) as u32;
                        let kb = (fs * 2 * page + row) * d;
                        let vb = ((fs * 2 + 1) * page + row) * d;
                        want_pool[kb..kb + d].copy_from_slice(key);
                        want_pool[vb..vb + d].copy_from_slice(&vv[e * d..(e + 1) * d]);
                    }
                }
            }
            let pool_dst = Tensor::from_vec(pool_dst, (n, h), &Device::Cpu).unwrap();
            let meta_dst = Tensor::from_vec(meta_dst, (n, h), &Device::Cpu).unwrap();
            ops::paged_append_with_minmax(&pool, &k, &v, &pool_dst, &meta, &meta_dst).unwrap();
            pos += n;
            assert_eq!(
                pool.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want_pool,
                "pool h={h} d={d} p={page}"
            );
            assert_eq!(
                meta.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want_meta,
                "meta h={h} d={d} p={page}"
            );
        }
    }
}

#[test]
fn topk_matches_full_sort() {
    let mut r = rng(6);
    for &(rows, n, k) in &[(5, 100, 7), (3, 4, 10), (2, 1000, 256)] {
        let mut s: Vec<f32> = (0..rows * n).map(|_| r.random::<f32>()).collect();
        for x in s.iter_mut().step_by(13) {
            *x = f32::NEG_INFINITY;
        }
        s[1] = f32::INFINITY;
        let t = Tensor::from_vec(s.clone(), (rows, n), &Device::Cpu).unwrap();
        let got = ops::topk_indices(&t, k).unwrap().to_vec2::<u32>().unwrap();
        for ri in 0..rows {
            let row = &s[ri * n..(ri + 1) * n];
            let mut idx: Vec<u32> = (0..n as u32).filter(|&i| row[i as usize] > f32::NEG_INFINITY).collect();
            idx.sort_by(|a, b| row[*b as usize].partial_cmp(&row[*a as usize]).unwrap().then(a.cmp(b)));
            idx.truncate(k);
            idx.resize(k, NONE);
            assert_eq!(got[ri], idx, "row {ri}");
        }
    }
}

#[test]
fn copy_pages_moves_whole_pages() {
    let mut r = rng(7);
    let src = randn(&mut r, &[10, 2, 8, 16], 1.0);
    let dst = randn(&mut r, &[4, 2, 8, 16], 1.0);
    let pairs = Tensor::new(&[[7u32, 0], [2, 3]], &Device::Cpu).unwrap();
    ops::copy_pages(&dst, &src, &pairs).unwrap();
    assert_eq!(max_abs_diff(&dst.get(0).unwrap(), &src.get(7).unwrap()), 0.0);
    assert_eq!(max_abs_diff(&dst.get(3).unwrap(), &src.get(2).unwrap()), 0.0);
    let _ = DType::F32;
}

/// `merge_partials` against an f64 evaluation of its formula: random states of odd
/// sizes, with rows where one side (or both) attended nothing (`EMPTY_LSE`, zeros).
/// Tolerance 1e-5 relative on out and lse (f32 evaluation).
#[test]
fn merge_partials_matches_f64_formula() {
    let mut r = rng(11);
    for &(t, h, d) in &[(1, 1, 1), (3, 5, 7), (17, 9, 64)] {
        let rows = t * h;
        let out = |r: &mut rand::rngs::StdRng| randn(r, &[t, h, d], 1.0);
        let lse = |r: &mut rand::rngs::StdRng, empty: usize| {
            let v: Vec<f32> = (0..rows)
                .map(|i| {
                    if i % 4 == empty {
                        ops::EMPTY_LSE
                    } else {
                        r.random_range(-20.0f32..20.0)
                    }
                })
                .collect();
            Tensor::from_vec(v, (t, h), &Device::Cpu).unwrap()
        };
        let a = ops::AttentionPartial {
            out: out(&mut r),
            lse: lse(&mut r, 1),
        };
        let b = ops::AttentionPartial {
            out: out(&mut r),
            lse: lse(&mut r, 2),
        };
        let got = ops::merge_partials(&a, &b).unwrap();
        let v = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (oa, ob, la, lb) = (v(&a.out), v(&b.out), v(&a.lse), v(&b.lse));
        let (go, gl) = (v(&got.out), v(&got.lse));
        for i in 0..rows {
            let (x, y) = (la[i] as f64, lb[i] as f64);
            let m = x.max(y);
            let (wa, wb) = ((x - m).exp(), (y - m).exp());
            let lse = m + (wa + wb).ln();
            assert!(
                (gl[i] as f64 - lse).abs() <= 1e-5 * (1.0 + lse.abs()),
                "lse row {i}: {} vs {lse}",
                gl[i]
            );
            for j in 0..d {
                let want = (oa[i * d + j] as f64 * wa + ob[i * d + j] as f64 * wb) / (wa + wb);
                let e = (go[i * d + j] as f64 - want).abs();
                assert!(
                    e <= 1e-5 * (1.0 + want.abs()),
                    "out ({i}, {j}): {} vs {want}",
                    go[i * d + j]
                );
            }
        }
    }
    // Mismatched shapes are a clear error naming the op.
    let a = ops::AttentionPartial {
        out: Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap(),
        lse: Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
    };
    let b = ops::AttentionPartial {
        out: Tensor::zeros((2, 3, 5), DType::F32, &Device::Cpu).unwrap(),
        lse: Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
    };
    let e = ops::merge_partials(&a, &b).unwrap_err().to_string();
    assert!(e.contains("merge_partials") && e.contains("[2, 3, 5]"), "{e}");
}
