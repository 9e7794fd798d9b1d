//! Quest's int8 page bounds (`ops::quest_q8`, issue 12): the update against an f64
//! quantization of the exact bounds written here, for any grouping of the tokens into
//! calls; scoring against the formula on the dequantized bounds, and as an upper bound
//! of the exact score; bad shapes; and on CUDA the update (plain and fused with the
//! append) bit-exact and the scores within 1e-4 relative of the CPU, with poisoned outputs.

#![allow(clippy::needless_range_loop)]

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use rand::seq::SliceRandom;
use rand::Rng;
use spinkv::ops::{self, NONE};

/// Smallest power of two `s` (exponent in -126..=120) with `m ≤ 127 s`, in f64.
fn scale_f64(m: f64) -> f64 {
    let mut e = -126i32;
    while m > 127.0 * 2f64.powi(e) && e < 120 {
        e += 1;
    }
    2f64.powi(e)
}

/// The int8 row that the exact bounds of `keys` (rows of `d`) quantize to.
fn reference_row(keys: &[Vec<f32>], d: usize) -> Vec<u8> {
    let mut row = vec![0u8; ops::quest_q8_row_bytes(d)];
    let m = keys.iter().flatten().fold(0f64, |m, &x| m.max((x as f64).abs()));
    let s = scale_f64(m);
    for i in 0..d {
        let lo = keys.iter().map(|k| k[i] as f64).fold(f64::MAX, f64::min);
        let hi = keys.iter().map(|k| k[i] as f64).fold(f64::MIN, f64::max);
        row[i] = ((lo / s).floor() as i8) as u8;
        row[d + i] = ((hi / s).ceil() as i8) as u8;
    }
    row[2 * d..2 * d + 4].copy_from_slice(&(s as f32).to_le_bytes());
    row
}

/// Keys of `t` tokens × `h` heads × `d`, channels of very different magnitudes (as real
/// keys have) and growing over time, so that pages rescale as tokens arrive.
fn keys(r: &mut rand::rngs::StdRng, t: usize, h: usize, d: usize, t0: usize) -> Vec<f32> {
    (0..t * h * d)
        .map(|i| {
            let (ti, x) = (i / (h * d), i % d);
            let mag = 0.01 * (1.0 + (x % 7) as f32 * 3.0) * (1.0 + (t0 + ti) as f32 * 0.3);
            (r.random::<f32>() * 2.0 - 1.0) * mag
        })
        .collect()
}

/// Feeds `total` tokens of `h` heads into random slots in chunks of random sizes (some
/// entries NONE, which the bounds skip), calling `update` per chunk; returns, per
/// (head, page), its slot and the keys it received.
#[allow(clippy::type_complexity)]
fn feed(
    r: &mut rand::rngs::StdRng,
    (total, h, d, page, slots): (usize, usize, usize, usize, usize),
    dt: DType,
    mut update: impl FnMut(&Tensor, &Tensor),
) -> Vec<(u32, Vec<Vec<f32>>)> {
    let pages = total.div_ceil(page);
    let mut free: Vec<u32> = (0..slots as u32).collect();
    free.shuffle(r);
    let slot: Vec<Vec<u32>> = (0..h)
        .map(|_| (0..pages).map(|_| free.pop().unwrap()).collect())
        .collect();
    let mut got: Vec<Vec<Vec<Vec<f32>>>> = vec![vec![Vec::new(); pages]; h];
    let mut pos = 0;
    while pos < total {
        let n = [1, 1, 3, 7, 16, 40][r.random_range(0..6)].min(total - pos);
        let kv = keys(r, n, h, d, pos);
        let k = Tensor::from_vec(kv.clone(), (n, h, d), &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        // The keys as the op sees them (rounded to dt).
        let kr = k
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut dst = vec![NONE; n * h];
        for t in 0..n {
            let (lp, row) = ((pos + t) / page, (pos + t) % page);
            for hi in 0..h {
                // Skip a token now and then, but never a page's first (its reset).
                if row != 0 && r.random_range(0..8) == 0 {
                    continue;
                }
                dst[t * h + hi] = slot[hi][lp] * page as u32 + row as u32;
                got[hi][lp].push(kr[(t * h + hi) * d..][..d].to_vec());
            }
        }
        update(&k, &Tensor::from_vec(dst, (n, h), &Device::Cpu).unwrap());
        pos += n;
    }
    (0..h)
        .flat_map(|hi| (0..pages).map(move |p| (hi, p)))
        .map(|(hi, p)| (slot[hi][p], got[hi][p].clone()))
        .collect()
}

fn bytes(t: &Tensor) -> Vec<u8> {
    t.flatten_all()
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
        .to_vec1::<u8>()
        .unwrap()
}

/// Garbage bytes (stale bounds and scales, which a page's first token must reset).
fn garbage(r: &mut rand::rngs::StdRng, slots: usize, d: usize) -> Tensor {
    let rb = ops::quest_q8_row_bytes(d);
    let v: Vec<u8> = (0..slots * rb).map(|_| r.random()).collect();
    Tensor::from_vec(v, (slots, rb), &Device::Cpu).unwrap()
}

#[test]
fn int8_bounds_are_the_quantized_exact_bounds() {
    let mut r = rng(81);
    for dt in [DType::F32, DType::BF16, DType::F16] {
        for &(total, h, d, page) in &[(100usize, 2usize, 16usize, 16usize), (37, 3, 64, 8), (9, 1, 6, 4)] {
            let slots = total.div_ceil(page) * h + 5;
            let meta = garbage(&mut r, slots, d);
            // Through paged_append_with_minmax too (the cache's call): same bounds.
            let meta2 = garbage(&mut r, slots, d);
            let pool = Tensor::zeros((3, 2, page, d), dt, &Device::Cpu).unwrap();
            let pages = feed(&mut r, (total, h, d, page, slots), dt, |k, dst| {
                ops::quest_meta_update(&meta, k, dst, page).unwrap();
                let none = Tensor::full(NONE, dst.dims(), &Device::Cpu).unwrap();
                ops::paged_append_with_minmax(&pool, k, k, &none, &meta2, dst).unwrap();
            });
            let (got, got2) = (bytes(&meta), bytes(&meta2));
            let rb = ops::quest_q8_row_bytes(d);
            for (slot, ks) in pages {
                let s = slot as usize;
                let want = reference_row(&ks, d);
                assert_eq!(&got[s * rb..(s + 1) * rb], &want[..], "{dt:?} d={d} p={page} slot {s}");
                assert_eq!(&got2[s * rb..(s + 1) * rb], &want[..], "fused {dt:?} d={d} slot {s}");
                // The dequantized box holds every key.
                let deq = ops::dequantize_quest_q8(&meta.narrow(0, s, 1).unwrap(), d).unwrap();
                let deq = deq.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for k in &ks {
                    for i in 0..d {
                        assert!(deq[i] <= k[i] && k[i] <= deq[d + i], "{dt:?} slot {s} dim {i}");
                    }
                }
            }
        }
    }
}

/// Random int8 bounds built from keys, and the exact `[slots, 2, d]` f32 bounds of the
/// same keys.
fn bounds(r: &mut rand::rngs::StdRng, slots: usize, d: usize, page: usize) -> (Tensor, Tensor) {
    let q8 = ops::quest_q8_bounds(slots, d, &Device::Cpu).unwrap();
    let exact = Tensor::zeros((slots, 2, d), DType::F32, &Device::Cpu).unwrap();
    let k = Tensor::from_vec(keys(r, slots * page, 1, d, 0), (slots * page, 1, d), &Device::Cpu).unwrap();
    let dst: Vec<u32> = (0..(slots * page) as u32).collect();
    let dst = Tensor::from_vec(dst, (slots * page, 1), &Device::Cpu).unwrap();
    ops::quest_meta_update(&q8, &k, &dst, page).unwrap();
    ops::quest_meta_update(&exact, &k, &dst, page).unwrap();
    (q8, exact)
}

fn candidates(r: &mut rand::rngs::StdRng, b: usize, hkv: usize, n: usize, slots: usize) -> Tensor {
    let mut cand = vec![NONE; b * hkv * n];
    for (i, c) in cand.iter_mut().enumerate() {
        if i % n < n - 3 {
            *c = r.random_range(0..slots as u32);
        }
    }
    Tensor::from_vec(cand, (b, hkv, n), &Device::Cpu).unwrap()
}

fn f32v(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn int8_scores_follow_the_formula_and_bound_the_exact_scores() {
    let mut r = rng(82);
    for &(b, hq, hkv, d) in &[(2usize, 6usize, 2usize, 64usize), (1, 4, 4, 24), (3, 8, 1, 128)] {
        let (slots, n, page) = (40, 23, 8);
        let (q8, exact) = bounds(&mut r, slots, d, page);
        let q = randn(&mut r, &[b, hq, d], 1.0);
        let cand = candidates(&mut r, b, hkv, n, slots);
        let got = f32v(&ops::quest_page_scores(&q, &q8, &cand, 1, 2).unwrap());
        let upper = f32v(&ops::quest_page_scores(&q, &exact, &cand, 1, 2).unwrap());
        let deq = f32v(&ops::dequantize_quest_q8(&q8, d).unwrap());
        let (qv, cv) = (f32v(&q), u32s(&cand));
        let g = hq / hkv;
        for i in 0..b * hkv * n {
            let (bi, h, j) = (i / (hkv * n), (i / n) % hkv, i % n);
            let c = cv[i];
            if c == NONE || j < 1 || j + 2 >= n - 3 {
                assert_eq!(got[i], upper[i], "forced and padding pages score as with exact bounds");
                continue;
            }
            let mut best = f64::NEG_INFINITY;
            let mut mag = 0f64;
            for qi in 0..g {
                let qh = &qv[(bi * hq + h * g + qi) * d..][..d];
                let row = &deq[c as usize * 2 * d..][..2 * d];
                let s: f64 = (0..d)
                    .map(|x| (qh[x] as f64 * row[x] as f64).max(qh[x] as f64 * row[d + x] as f64))
                    .sum();
                mag = mag.max((0..d).map(|x| (qh[x] as f64 * row[d + x] as f64).abs()).sum());
                best = best.max(s);
            }
            let tol = 1e-5 * mag + 1e-6;
            assert!(
                (got[i] as f64 - best).abs() <= tol,
                "score {} vs {best} (b={bi} h={h} j={j})",
                got[i]
            );
            assert!(
                got[i] as f64 >= upper[i] as f64 - tol,
                "int8 {} below exact {}",
                got[i],
                upper[i]
            );
        }
    }
}

#[test]
fn bad_int8_bounds_are_rejected_with_the_shapes() {
    let dev = Device::Cpu;
    let q = Tensor::zeros((1, 4, 64), DType::F32, &dev).unwrap();
    let cand = Tensor::zeros((1, 2, 3), DType::U32, &dev).unwrap();
    let wrong = Tensor::zeros((5, 130), DType::U8, &dev).unwrap();
    let e = ops::quest_page_scores(&q, &wrong, &cand, 0, 1).unwrap_err().to_string();
    assert!(
        e.contains("quest_page_scores") && e.contains("[slots, 144]") && e.contains("[5, 130]"),
        "{e}"
    );
    let k = Tensor::zeros((2, 1, 64), DType::F32, &dev).unwrap();
    let dst = Tensor::zeros((2, 1), DType::U32, &dev).unwrap();
    let e = ops::quest_meta_update(&wrong, &k, &dst, 16).unwrap_err().to_string();
    assert!(e.contains("quest_meta_update") && e.contains("[5, 130]"), "{e}");
    let out_of_range = Tensor::from_vec(vec![5 * 16u32, 0], (2, 1), &dev).unwrap();
    let ok = ops::quest_q8_bounds(5, 64, &dev).unwrap();
    let e = ops::quest_meta_update(&ok, &k, &out_of_range, 16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("slot 5 out of range"), "{e}");
    assert!(ops::dequantize_quest_q8(&wrong, 64).is_err());
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;

    #[test]
    fn int8_update_on_cuda_is_bit_exact() {
        let Some(dev) = cuda_or_skip("int8_update_on_cuda_is_bit_exact") else {
            return;
        };
        spinkv::ops::set_poison_outputs(true);
        let mut r = rng(83);
        for dt in [DType::F32, DType::BF16, DType::F16] {
            for &(total, h, d, page) in &[(300usize, 8usize, 128usize, 16usize), (77, 3, 64, 8), (20, 2, 40, 32)] {
                let slots = total.div_ceil(page) * h + 5;
                let meta = garbage(&mut r, slots, d);
                let (meta_g, meta2_g) = (meta.to_device(&dev).unwrap(), meta.to_device(&dev).unwrap());
                let pool_g = Tensor::zeros((3, 2, page, d), dt, &dev).unwrap();
                feed(&mut r, (total, h, d, page, slots), dt, |k, dst| {
                    ops::quest_meta_update(&meta, k, dst, page).unwrap();
                    let (kg, dg) = (k.to_device(&dev).unwrap(), dst.to_device(&dev).unwrap());
                    ops::quest_meta_update(&meta_g, &kg, &dg, page).unwrap();
                    let none = Tensor::full(NONE, dst.dims(), &dev).unwrap();
                    ops::paged_append_with_minmax(&pool_g, &kg, &kg, &none, &meta2_g, &dg).unwrap();
                });
                let want = bytes(&meta);
                assert_eq!(bytes(&meta_g), want, "quest_meta_update {dt:?} d={d} p={page}");
                assert_eq!(bytes(&meta2_g), want, "paged_append_with_minmax {dt:?} d={d} p={page}");
            }
        }
    }

    #[test]
    fn int8_scores_on_cuda_match_cpu() {
        let Some(dev) = cuda_or_skip("int8_scores_on_cuda_match_cpu") else {
            return;
        };
        spinkv::ops::set_poison_outputs(true);
        let mut r = rng(84);
        // Tensor-core paths (bf16/f16, D 64/128, groups 1..16) and the generic path (f32,
        // D 40); N across the per-block candidate split.
        let cases: &[(DType, usize, usize, usize, usize, usize)] = &[
            (DType::BF16, 8, 32, 8, 128, 2500),
            (DType::BF16, 2, 12, 3, 64, 37),
            (DType::F16, 1, 16, 1, 128, 300),
            (DType::BF16, 3, 16, 16, 64, 1000),
            (DType::F32, 2, 6, 2, 64, 77),
            (DType::BF16, 2, 8, 2, 40, 51),
        ];
        for &(dt, b, hq, hkv, d, n) in cases {
            let (slots, page) = (700, 16);
            let (q8, _) = bounds(&mut r, slots, d, page);
            let q = randn(&mut r, &[b, hq, d], 1.0).to_dtype(dt).unwrap();
            let cand = candidates(&mut r, b, hkv, n, slots);
            let want = f32v(&ops::quest_page_scores(&q, &q8, &cand, 1, 2).unwrap());
            let got = ops::quest_page_scores(
                &q.to_device(&dev).unwrap(),
                &q8.to_device(&dev).unwrap(),
                &cand.to_device(&dev).unwrap(),
                1,
                2,
            )
            .unwrap();
            let got = f32v(&got);
            let scale = want.iter().filter(|x| x.is_finite()).fold(0f32, |m, x| m.max(x.abs()));
            for i in 0..want.len() {
                let ok = if want[i].is_finite() {
                    (got[i] - want[i]).abs() <= 1e-4 * scale
                } else {
                    got[i] == want[i]
                };
                assert!(
                    ok,
                    "{dt:?} b={b} hq={hq} hkv={hkv} d={d} n={n} [{i}]: {} vs {}",
                    got[i], want[i]
                );
            }
        }
    }
}
