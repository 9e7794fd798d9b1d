//! ShadowKV's device ops (`spinkv::ops::shadowkv`) on CUDA against their CPU reference,
//! on random cases (a padding row, an owner with nothing compressed, `NONE` entries) that
//! take each kernel variant: the tensor-core rebuild (f16/bf16, head dims 64 and 128,
//! ranks a multiple of 16, page sizes 8 and 16) and the generic one (f32, head dim 40, a
//! rank of 40). Fresh outputs are poisoned (NaN / NONE) before the kernels run.
//!
//! The pairs are also counted in place (`count_listed_into`) on both devices.
//!
//! Tolerances: scores within 1e-5·(1 + |x|) with `-inf` at the same entries (f32
//! summation order); lists and values bit-exact; rebuilt keys within 1e-4·(1 + |x|) for
//! f32 and one rounding of the output (8e-3·(1 + |x|) for bf16, 1e-3·(1 + |x|) for f16).
#![cfg(feature = "cuda")]

mod common;

use candle_core::DType;
use common::shadowkv::{skv_case, SkvSizes};
use common::*;
use rand::Rng;
use spinkv::ops;

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let ok = (x == y) || (x - y).abs() <= tol * (1.0 + x.abs());
        assert!(ok, "{what}[{i}]: cpu {x} vs cuda {y}");
    }
}

#[test]
fn shadowkv_ops_match_cpu() {
    let Some(dev) = cuda_or_skip("shadowkv_ops_match_cpu") else {
        return;
    };
    ops::set_poison_outputs(true);
    let cases = [
        (DType::BF16, 6, 2, 3, 64, 8, 32, 7),
        (DType::BF16, 5, 3, 4, 128, 16, 160, 9),
        (DType::BF16, 7, 1, 16, 64, 8, 160, 20),
        (DType::F16, 5, 2, 5, 64, 8, 48, 6),
        (DType::F16, 4, 2, 2, 64, 8, 40, 6),
        (DType::F32, 5, 3, 3, 40, 4, 12, 5),
    ];
    for (i, &(dtype, b, hkv, g, d, p, r, k)) in cases.iter().enumerate() {
        let sz = SkvSizes {
            dtype,
            b,
            hkv,
            g,
            d,
            p,
            r,
            k,
        };
        let cpu = skv_case(80 + i as u64, sz);
        let gpu = cpu.to(&dev);
        let what = format!("case {i} {sz:?}");
        // Scores.
        let (a, b_) = (f32s(&cpu.scores(0.125).unwrap()), f32s(&gpu.scores(0.125).unwrap()));
        for (j, (x, y)) in a.iter().zip(&b_).enumerate() {
            assert_eq!(x.is_finite(), y.is_finite(), "{what}: scores[{j}] {x} vs {y}");
        }
        close(&a, &b_, 1e-5, &format!("{what}: scores"));
        assert!(
            a.iter().filter(|x| x.is_finite()).count() > 10,
            "{what}: too few finite scores"
        );
        // Lists.
        for with_top in [false, true] {
            let (s0, p0) = cpu.lists(with_top).unwrap();
            let (s1, p1) = gpu.lists(with_top).unwrap();
            assert_eq!(u32s(&s0), u32s(&s1), "{what}: selection (with_top {with_top})");
            assert_eq!(u32s(&p0), u32s(&p1), "{what}: pairs");
        }
        // Counting the listed pairs in place (into a counter that already holds counts).
        let (_, pairs) = gpu.lists(false).unwrap();
        let start = [0.5f32, 7.0, 1.0];
        let (cc, gc) = (
            candle_core::Tensor::new(&start, &candle_core::Device::Cpu).unwrap(),
            candle_core::Tensor::new(&start, &dev).unwrap(),
        );
        ops::count_listed_into(&cc, 1, &pairs.to_device(&candle_core::Device::Cpu).unwrap()).unwrap();
        ops::count_listed_into(&gc, 1, &pairs).unwrap();
        assert_eq!(f32s(&cc), f32s(&gc), "{what}: counts");
        assert!(f32s(&gc)[1] > 7.0, "{what}: nothing counted");
        // Rebuild, with and without values.
        let tol = match dtype {
            DType::BF16 => 8e-3,
            DType::F16 => 1e-3,
            _ => 1e-4,
        };
        for with_values in [true, false] {
            let (x, y) = (cpu.rebuild(with_values).unwrap(), gpu.rebuild(with_values).unwrap());
            assert_eq!(x.dims(), y.dims());
            let keys = |t: &candle_core::Tensor| f32s(&t.narrow(1, 0, 1).unwrap());
            close(&keys(&x), &keys(&y), tol, &format!("{what}: keys"));
            let vals = |t: &candle_core::Tensor| bits(&t.narrow(1, 1, 1).unwrap().contiguous().unwrap());
            assert_eq!(vals(&x), vals(&y), "{what}: values (with_values {with_values})");
        }
    }
    // A list of 70,001 pairs, about a third empty: the count spans many blocks.
    let mut r = rng(99);
    let words: Vec<u32> = (0..70_001)
        .flat_map(|i| {
            if r.random::<f32>() < 0.35 {
                [ops::NONE, ops::NONE]
            } else {
                [i, 5]
            }
        })
        .collect();
    let want = words.chunks(2).filter(|w| w[0] != ops::NONE).count() as f32;
    let pairs = candle_core::Tensor::from_vec(words, (70_001, 2), &dev).unwrap();
    let counts = candle_core::Tensor::new(&[3.0f32, 0.0], &dev).unwrap();
    ops::count_listed_into(&counts, 0, &pairs).unwrap();
    assert_eq!(f32s(&counts), [3.0 + want, 0.0], "a long list's count");
    ops::set_poison_outputs(false);
}
