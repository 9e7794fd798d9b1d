//! ShadowKV's device ops (`spinkv::ops::shadowkv`) on the CPU against references written
//! here in f64, on random cases (a padding row, an owner with nothing compressed, odd
//! sizes), and their errors on bad input.
//!
//! Tolerances: scores within 1e-5 (probabilities in [0, 1]; `-inf` at the same entries);
//! lists exact; rebuilt keys within 1e-4·(1 + |x|) for f32 and 1e-2·(1 + |x|) for bf16
//! (one rounding of the output); values exact; entries without a chunk all zero.

mod common;

use candle_core::{DType, Tensor};
use common::shadowkv::{skv_case, SkvCase, SkvSizes, SKV_N, SKV_OUT};
use common::*;
use spinkv::ops::NONE;
use spinkv::Error;

const SIZES: [SkvSizes; 3] = [
    SkvSizes {
        dtype: DType::F32,
        b: 5,
        hkv: 3,
        g: 3,
        d: 40,
        p: 4,
        r: 12,
        k: 5,
    },
    SkvSizes {
        dtype: DType::BF16,
        b: 4,
        hkv: 2,
        g: 4,
        d: 64,
        p: 8,
        r: 32,
        k: 6,
    },
    SkvSizes {
        dtype: DType::F32,
        b: 5,
        hkv: 1,
        g: 5,
        d: 18,
        p: 3,
        r: 7,
        k: 9,
    },
];

/// Per row: (owner, position, live), and (ef, np).
fn rows_of(c: &SkvCase) -> Vec<([usize; 3], (usize, usize))> {
    let rows = u32s(&c.rows);
    let chunks = u32s(&c.chunks);
    rows.chunks(4)
        .map(|w| {
            let (o, pos, live) = (w[0] as usize, w[1] as usize, w[2] as usize);
            let ch = if live > 0 { chunks[o] as usize } else { 0 };
            let ef = if live == 0 {
                0
            } else {
                ((pos + 1).saturating_sub(c.geo.window) / c.geo.page_size).min(ch)
            };
            let np = if live == 0 {
                0
            } else {
                (pos + 1).div_ceil(c.geo.page_size)
            };
            ([o, pos, live], (ef, np))
        })
        .collect()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    f32s(t).into_iter().map(f64::from).collect()
}

#[test]
fn scores_match_an_f64_reference() {
    for (i, sz) in SIZES.iter().enumerate() {
        let c = skv_case(40 + i as u64, *sz);
        let scale = 0.37f32;
        let got = f32s(&c.scores(scale).unwrap());
        let (q, lm, flags) = (f64s(&c.q), f64s(&c.lm), f32s(&c.outlier));
        let cand = u32s(&c.candidates);
        let chunks = u32s(&c.chunks);
        let (hkv, g, d) = (sz.hkv, sz.g, sz.d);
        let mut finite = 0;
        for (bi, ([o, _, live], (ef, _))) in rows_of(&c).into_iter().enumerate() {
            let nc = if live > 0 { chunks[o] as usize } else { 0 };
            for h in 0..hkv {
                let row = &cand[(bi * hkv + h) * SKV_N..][..SKV_N];
                let logit = |gi: usize, j: usize| -> f64 {
                    let qr = &q[(bi * hkv * g + h * g + gi) * d..][..d];
                    let s = row[j] as usize;
                    (0..d).map(|x| qr[x] * lm[s * d + x]).sum::<f64>() * scale as f64
                };
                for j in 0..SKV_N {
                    let v = got[(bi * hkv + h) * SKV_N + j];
                    if j >= ef {
                        assert_eq!(v, f32::NEG_INFINITY, "case {i} row {bi} head {h} chunk {j} (ef {ef})");
                        continue;
                    }
                    let best = (0..g)
                        .map(|gi| {
                            let m = (0..nc).map(|x| logit(gi, x)).fold(f64::NEG_INFINITY, f64::max);
                            let sum: f64 = (0..nc).map(|x| (logit(gi, x) - m).exp()).sum();
                            (logit(gi, j) - m).exp() / sum
                        })
                        .fold(f64::NEG_INFINITY, f64::max);
                    let flag = flags[row[j] as usize];
                    if flag == f32::NEG_INFINITY {
                        assert_eq!(v, f32::NEG_INFINITY, "case {i}: outlier at {j}");
                    } else {
                        finite += 1;
                        assert!(
                            (v as f64 - best).abs() < 1e-5,
                            "case {i} row {bi} head {h} chunk {j}: {v} vs {best}"
                        );
                    }
                }
            }
        }
        assert!(
            finite > 10,
            "case {i}: only {finite} finite scores (a case that tests little)"
        );
    }
}

#[test]
fn lists_match_a_reference() {
    for (i, sz) in SIZES.iter().enumerate() {
        let c = skv_case(50 + i as u64, *sz);
        for with_top in [false, true] {
            let (sel, pairs) = c.lists(with_top).unwrap();
            let w = SKV_OUT + SKV_N + if with_top { sz.k } else { 0 };
            assert_eq!(sel.dims(), [sz.b, sz.hkv, w]);
            assert_eq!(pairs.dims(), [sz.b, sz.hkv, sz.k, 2]);
            let (sel, pairs) = (u32s(&sel), u32s(&pairs));
            let (oids, top) = (u32s(&c.outlier_ids), u32s(&c.top));
            for (bi, ([o, _, live], (ef, np))) in rows_of(&c).into_iter().enumerate() {
                for h in 0..sz.hkv {
                    let bh = bi * sz.hkv + h;
                    let mut want = vec![NONE; w];
                    for j in 0..SKV_OUT {
                        let id = oids[(o * sz.hkv + h) * SKV_OUT + j];
                        if live > 0 && id != NONE && (id as usize) < ef {
                            want[j] = id;
                        }
                    }
                    for j in ef..np {
                        want[SKV_OUT + j] = j as u32;
                    }
                    if with_top {
                        want[SKV_OUT + SKV_N..].copy_from_slice(&top[bh * sz.k..][..sz.k]);
                    }
                    assert_eq!(&sel[bh * w..][..w], &want[..], "case {i} row {bi} head {h}");
                    for j in 0..sz.k {
                        let t = top[bh * sz.k + j];
                        let e = (bh * sz.k + j) as u32;
                        let want = if t == NONE { [NONE, NONE] } else { [e, t] };
                        assert_eq!(pairs[2 * e as usize..][..2], want, "case {i} pair {e}");
                    }
                }
            }
        }
    }
}

#[test]
fn rebuild_matches_an_f64_reference() {
    for (i, sz) in SIZES.iter().enumerate() {
        let c = skv_case(60 + i as u64, *sz);
        let (p, d, r, hkv, k) = (sz.p, sz.d, sz.r, sz.hkv, sz.k);
        let tol = if sz.dtype == DType::F32 { 1e-4 } else { 1e-2 };
        for with_values in [true, false] {
            let pool = c.rebuild(with_values).unwrap();
            assert_eq!(pool.dims(), [sz.b * hkv * k, 2, p, d]);
            assert_eq!(pool.dtype(), sz.dtype);
            let got = f64s(&pool);
            let (left, right, vals) = (f64s(&c.left), f64s(&c.right), f64s(&c.values));
            let (cos, sin) = (f64s(&c.cos), f64s(&c.sin));
            let (top, cand, lmap) = (u32s(&c.top), u32s(&c.candidates), f32s(&c.left_map));
            let rows = u32s(&c.rows);
            let mut rebuilt = 0;
            for e in 0..sz.b * hkv * k {
                let (bh, bi) = (e / k, e / k / hkv);
                let h = bh % hkv;
                let page_out = &got[e * 2 * p * d..][..2 * p * d];
                let t = top[e];
                if t == NONE {
                    assert!(
                        page_out.iter().all(|&x| x == 0.0),
                        "case {i}: entry {e} without a chunk is not zero"
                    );
                    continue;
                }
                rebuilt += 1;
                let t = t as usize;
                let slot = cand[bh * SKV_N + t] as usize;
                let lp = lmap[cand[bi * hkv * SKV_N + t] as usize] as usize;
                let owner = rows[4 * bi] as usize;
                for ii in 0..p {
                    let x: Vec<f64> = (0..d)
                        .map(|col| {
                            (0..r)
                                .map(|j| left[(lp * p + ii) * r + j] * right[(owner * r + j) * hkv * d + h * d + col])
                                .sum()
                        })
                        .collect();
                    let pos = t * p + ii;
                    for col in 0..d / 2 {
                        let (cs, sn) = (cos[pos * d / 2 + col], sin[pos * d / 2 + col]);
                        let want = [x[col] * cs - x[col + d / 2] * sn, x[col] * sn + x[col + d / 2] * cs];
                        for (half, w) in want.iter().enumerate() {
                            let g = page_out[ii * d + col + half * d / 2];
                            assert!(
                                (g - w).abs() <= tol * (1.0 + w.abs()),
                                "case {i} entry {e} row {ii} dim {col}+{half}: {g} vs {w}"
                            );
                        }
                    }
                    for col in 0..d {
                        let want = if with_values {
                            vals[((slot * 2 + 1) * p + ii) * d + col]
                        } else {
                            0.0
                        };
                        assert_eq!(
                            page_out[(p + ii) * d + col],
                            want,
                            "case {i} entry {e} value {ii},{col}"
                        );
                    }
                }
            }
            assert!(rebuilt > 3, "case {i}: only {rebuilt} rebuilt entries");
        }
    }
}

fn invalid(r: spinkv::Result<impl std::fmt::Debug>, op: &str, mentions: &str) {
    match r {
        Err(Error::Invalid { op: o, msg }) => {
            assert_eq!(o, op);
            assert!(msg.contains(mentions), "{op}: {msg:?} does not mention {mentions:?}");
        }
        other => panic!("{op}: expected an Invalid error mentioning {mentions:?}, got {other:?}"),
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let c = skv_case(70, SIZES[0]);
    let mut bad = c.to(&candle_core::Device::Cpu);
    bad.lm = c.lm.narrow(1, 0, 39).unwrap().contiguous().unwrap();
    invalid(bad.scores(1.0), "shadowkv_scores", "lm");
    let mut bad = c.to(&candle_core::Device::Cpu);
    bad.q = c.q.narrow(1, 0, 8).unwrap().contiguous().unwrap();
    invalid(bad.scores(1.0), "shadowkv_scores", "heads");
    let mut bad = c.to(&candle_core::Device::Cpu);
    bad.rows = c.rows.narrow(0, 0, 2).unwrap();
    invalid(bad.scores(1.0), "shadowkv_scores", "rows");
    invalid(bad.lists(false), "shadowkv_lists", "rows");
    let mut bad = c.to(&candle_core::Device::Cpu);
    bad.outlier_ids = c.outlier_ids.narrow(1, 0, 2).unwrap().contiguous().unwrap();
    invalid(bad.lists(false), "shadowkv_lists", "outlier_ids");
    let mut bad = c.to(&candle_core::Device::Cpu);
    bad.right = c.right.narrow(1, 0, 5).unwrap().contiguous().unwrap();
    invalid(bad.rebuild(true), "shadowkv_rebuild", "right");
    let mut bad = c.to(&candle_core::Device::Cpu);
    bad.values = c.values.to_dtype(DType::BF16).unwrap();
    invalid(bad.rebuild(true), "shadowkv_rebuild", "values");
    let mut bad = c.to(&candle_core::Device::Cpu);
    bad.cos = c.cos.narrow(1, 0, 3).unwrap().contiguous().unwrap();
    invalid(bad.rebuild(true), "shadowkv_rebuild", "cos");
    // A chunk past the candidates, and a left page past the table: errors, not panics.
    let mut bad = c.to(&candle_core::Device::Cpu);
    bad.top = (c.top.ones_like().unwrap() * (SKV_N as f64 + 2.0)).unwrap();
    assert!(bad.rebuild(true).is_err());
    let mut bad = c.to(&candle_core::Device::Cpu);
    bad.left_map = (c.left_map.ones_like().unwrap() * 1e6).unwrap();
    assert!(bad.rebuild(true).is_err());
}

/// `count_listed_into` adds the chosen chunks of `shadowkv_lists`'s pairs (a view at an
/// offset of the op's output) to one counter, leaving the others.
#[test]
fn listed_pairs_are_counted_in_place() {
    let c = skv_case(90, SIZES[1]);
    let (_, pairs) = c.lists(true).unwrap();
    let chosen = u32s(&c.top).iter().filter(|&&t| t != NONE).count();
    assert!(chosen > 0);
    let counts = Tensor::new(&[1.0f32, 2.0, 3.0], &candle_core::Device::Cpu).unwrap();
    spinkv::ops::count_listed_into(&counts, 1, &pairs).unwrap();
    spinkv::ops::count_listed_into(&counts, 1, &pairs).unwrap();
    assert_eq!(f32s(&counts), [1.0, 2.0 + 2.0 * chosen as f32, 3.0]);
    invalid(
        spinkv::ops::count_listed_into(&counts, 3, &pairs),
        "count_listed_into",
        "index",
    );
    invalid(
        spinkv::ops::count_listed_into(&counts, 0, &c.top),
        "count_listed_into",
        "pairs",
    );
}
