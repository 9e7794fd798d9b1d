//! The fused model ops ([`add_rms_norm`], [`rms_norm`], [`silu_mul`], [`rope_qkv`])
//! against plain f64 evaluations (written here, or `common::rope_f64`), on random inputs
//! of odd sizes (1 to 37 rows, widths from 1 to 4100; RoPE over strided views of a fused
//! QKV projection), in f32, f16 and bf16, and against candle's unfused ops. Tolerances: the
//! result's own rounding (f32 1e-5, f16 2e-3, bf16 1.6e-2 relative to the row's scale),
//! since the reference rounds the intermediate sum and SiLU where the ops do. With the
//! `cuda` feature the same cases run on GPU 0 with poisoned outputs and must match the CPU
//! op within the same tolerance (the CUDA test returns early without a GPU).
//!
//! `rope_tables_into` (tables from positions, on the device) must equal the host tables
//! of `spinkv::rope::rope_tables` bit for bit on the CPU, and within one unit in the last
//! place of the dtype on CUDA (both compute the angle in f64 with their own libm), over
//! NaN-poisoned tables.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{f32s, randn, rng, rope_f64};
use spinkv::ops::{add_rms_norm, rms_norm, rope_qkv, rope_tables_into, silu_mul};
use spinkv::rope::{apply_rope, rope_tables};

// 576, 64, 1536 and 4096 take the CUDA 16-byte path (4100 too in f32), 577 and 4100 the
// scalar one; 40000 is past the 16-byte path's row length.
const SHAPES: [(usize, usize); 8] = [
    (1, 1),
    (1, 576),
    (3, 64),
    (17, 577),
    (37, 1536),
    (2, 4100),
    (7, 4096),
    (2, 40000),
];
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn tol(dt: DType) -> f64 {
    match dt {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 1.6e-2,
    }
}

/// `x` rounded to `dt` and back, in f64.
fn round(x: f64, dt: DType) -> f64 {
    Tensor::new(&[x as f32], &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

/// The plain evaluation: (sum rounded to `dt`, its RMSNorm in f64).
fn reference(x: &[f32], d: Option<&[f32]>, alpha: &[f32], cols: usize, dt: DType) -> (Vec<f64>, Vec<f64>) {
    let sum: Vec<f64> = match d {
        Some(d) => x.iter().zip(d).map(|(&a, &b)| round(a as f64 + b as f64, dt)).collect(),
        None => x.iter().map(|&a| a as f64).collect(),
    };
    let mut norm = Vec::with_capacity(sum.len());
    for row in sum.chunks(cols) {
        let ms = row.iter().map(|v| v * v).sum::<f64>() / cols as f64;
        let s = 1.0 / (ms + 1e-5).sqrt();
        norm.extend(row.iter().zip(alpha).map(|(v, &a)| v * s * a as f64));
    }
    (sum, norm)
}

/// Max |got − want| over the row's largest |want| (plus 1e-30), per row, max over rows.
fn row_err(got: &[f32], want: &[f64], cols: usize) -> f64 {
    got.chunks(cols)
        .zip(want.chunks(cols))
        .map(|(g, w)| {
            let scale = w.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
            g.iter().zip(w).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max) / scale
        })
        .fold(0.0, f64::max)
}

/// Inputs of one case in `dt` on `dev`: x, delta, alpha, gu.
fn inputs(seed: u64, t: usize, h: usize, dt: DType, dev: &Device) -> [Tensor; 4] {
    let mut r = rng(seed);
    let mk = |r: &mut _, dims: &[usize], s: f32| randn(r, dims, s).to_dtype(dt).unwrap().to_device(dev).unwrap();
    [
        mk(&mut r, &[t, h], 1.0),
        mk(&mut r, &[t, h], 0.5),
        mk(&mut r, &[h], 1.0),
        mk(&mut r, &[t, 2 * h], 3.0),
    ]
}

#[test]
fn norms_match_the_f64_evaluation_and_candle() {
    for (i, &(t, h)) in SHAPES.iter().enumerate() {
        for dt in DTYPES {
            let [x, d, a, _] = inputs(i as u64, t, h, dt, &Device::Cpu);
            let (xs, ds, al) = (f32s(&x), f32s(&d), f32s(&a));
            let (sum, norm) = add_rms_norm(&x, &d, &a, 1e-5).unwrap();
            let (want_sum, want_norm) = reference(&xs, Some(&ds), &al, h, dt);
            let what = format!("add_rms_norm [{t}, {h}] {dt:?}");
            assert_eq!((sum.dims(), sum.dtype()), (&[t, h][..], dt), "{what}");
            assert_eq!(row_err(&f32s(&sum), &want_sum, h), 0.0, "{what}: the sum is exact");
            let e = row_err(&f32s(&norm), &want_norm, h);
            assert!(e <= tol(dt), "{what}: norm error {e}");
            // Against candle's separate add and norm (only on widths its CPU kernel takes).
            let unfused = candle_nn::ops::rms_norm(&(&x + &d).unwrap(), &a, 1e-5).unwrap();
            let e = row_err(
                &f32s(&norm),
                &f32s(&unfused).iter().map(|&v| v as f64).collect::<Vec<_>>(),
                h,
            );
            assert!(e <= tol(dt), "{what} vs candle: {e}");
            // The norm alone.
            let n = rms_norm(&x, &a, 1e-5).unwrap();
            let (_, want) = reference(&xs, None, &al, h, dt);
            let e = row_err(&f32s(&n), &want, h);
            assert!(e <= tol(dt), "rms_norm [{t}, {h}] {dt:?}: {e}");
        }
    }
}

#[test]
fn silu_mul_matches_the_f64_evaluation() {
    for (i, &(t, h)) in SHAPES.iter().enumerate() {
        for dt in DTYPES {
            let [_, _, _, gu] = inputs(10 + i as u64, t, h, dt, &Device::Cpu);
            let v = f32s(&gu);
            let want: Vec<f64> = v
                .chunks(2 * h)
                .flat_map(|row| {
                    let (g, u) = row.split_at(h);
                    g.iter()
                        .zip(u)
                        .map(|(&g, &u)| {
                            let g = g as f64;
                            round(g / (1.0 + (-g).exp()), dt) * u as f64
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            let got = silu_mul(&gu).unwrap();
            assert_eq!((got.dims(), got.dtype()), (&[t, h][..], dt));
            let e = row_err(&f32s(&got), &want, h);
            assert!(e <= tol(dt), "silu_mul [{t}, {h}] {dt:?}: {e}");
        }
    }
}

/// RoPE cases: (tokens, Hq, Hkv, D).
const ROPE: [(usize, usize, usize, usize); 4] = [(1, 1, 1, 2), (3, 9, 3, 64), (17, 4, 1, 128), (5, 7, 7, 6)];

/// A fused projection `[T, Hq + 2·Hkv, D]` in `dt` on `dev`, its q / k / v views, and the
/// tables of positions `pos`.
fn rope_inputs(
    seed: u64,
    c: (usize, usize, usize, usize),
    dt: DType,
    dev: &Device,
) -> (Tensor, Vec<u32>, Tensor, Tensor) {
    let (t, hq, hkv, d) = c;
    let qkv = randn(&mut rng(seed), &[t, hq + 2 * hkv, d], 1.0)
        .to_dtype(dt)
        .unwrap()
        .to_device(dev)
        .unwrap();
    let pos: Vec<u32> = (0..t as u32).map(|i| i * 37 + 5).collect();
    let (cos, sin) = rope_tables(&pos, d, 10_000.0, dt, dev).unwrap();
    (qkv, pos, cos, sin)
}

fn split(qkv: &Tensor, hq: usize, hkv: usize) -> [Tensor; 3] {
    [
        qkv.narrow(1, 0, hq).unwrap(),
        qkv.narrow(1, hq, hkv).unwrap(),
        qkv.narrow(1, hq + hkv, hkv).unwrap(),
    ]
}

#[test]
fn rope_qkv_matches_the_f64_rotation_and_candle() {
    for (ci, &c) in ROPE.iter().enumerate() {
        let (t, hq, hkv, d) = c;
        for dt in DTYPES {
            let (qkv, pos, cos, sin) = rope_inputs(ci as u64, c, dt, &Device::Cpu);
            let [q, k, v] = split(&qkv, hq, hkv);
            let (qr, kr, vc) = rope_qkv(&q, &k, &v, &cos, &sin).unwrap();
            let what = format!("rope_qkv {c:?} {dt:?}");
            assert_eq!(
                (qr.dims(), kr.dims(), vc.dims()),
                (&[t, hq, d][..], &[t, hkv, d][..], &[t, hkv, d][..])
            );
            assert!(qr.is_contiguous() && kr.is_contiguous() && vc.is_contiguous(), "{what}");
            assert_eq!(f32s(&vc), f32s(&v), "{what}: v is copied exactly");
            let posf: Vec<f64> = pos.iter().map(|&p| p as f64).collect();
            for (got, x, heads) in [(&qr, &q, hq), (&kr, &k, hkv)] {
                // The tables are rounded to the dtype: the f64 rotation uses exact angles.
                let want = f32s(&rope_f64(&x.to_dtype(DType::F32).unwrap(), &posf, 10_000.0));
                let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
                let e = row_err(&f32s(got), &want, heads * d);
                assert!(e <= tol(dt).max(2e-3) * 2.0, "{what}: {e}");
                let candle = apply_rope(x, &cos, &sin).unwrap();
                let e = row_err(
                    &f32s(got),
                    &f32s(&candle).iter().map(|&v| v as f64).collect::<Vec<_>>(),
                    heads * d,
                );
                assert!(e <= tol(dt) * 2.0, "{what} vs candle: {e}");
            }
        }
    }
}

#[test]
fn bad_inputs_are_rejected_with_their_shapes() {
    let d = Device::Cpu;
    let x = Tensor::zeros((3, 8), DType::F32, &d).unwrap();
    let a = Tensor::ones(8, DType::F32, &d).unwrap();
    let e = add_rms_norm(&x, &Tensor::zeros((3, 7), DType::F32, &d).unwrap(), &a, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("add_rms_norm") && e.contains("[3, 7]"), "{e}");
    let e = rms_norm(&x, &Tensor::ones(7, DType::F32, &d).unwrap(), 1e-5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rms_norm") && e.contains("[7]"), "{e}");
    assert!(rms_norm(&x, &a.to_dtype(DType::BF16).unwrap(), 1e-5).is_err());
    assert!(rms_norm(&Tensor::zeros(8, DType::F32, &d).unwrap(), &a, 1e-5).is_err());
    assert!(rms_norm(&Tensor::zeros((3, 0), DType::F32, &d).unwrap(), &a, 1e-5).is_err());
    let e = silu_mul(&Tensor::zeros((2, 5), DType::F32, &d).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("silu_mul") && e.contains("[2, 5]"), "{e}");
    assert!(silu_mul(&Tensor::zeros((2, 4), DType::U32, &d).unwrap()).is_err());
    let (qkv, _, cos, sin) = rope_inputs(0, (3, 2, 1, 8), DType::F32, &d);
    let [q, k, v] = split(&qkv, 2, 1);
    let e = rope_qkv(&q, &k, &v, &cos.narrow(0, 0, 2).unwrap(), &sin)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rope_qkv") && e.contains("[2, 4]"), "{e}");
    assert!(rope_qkv(&q, &q, &v, &cos, &sin).is_err(), "k with Hq heads");
    assert!(rope_qkv(&q, &k, &v.to_dtype(DType::BF16).unwrap(), &cos, &sin).is_err());
    // Zero rows are fine.
    let empty = Tensor::zeros((0, 8), DType::F32, &d).unwrap();
    assert_eq!(rms_norm(&empty, &a, 1e-5).unwrap().dims(), [0, 8]);
}

const POSITIONS: [u32; 9] = [0, 1, 2, 7, 63, 1000, 8191, 32_769, 131_071];

/// `rope_tables_into` over NaN-poisoned `[2, B, D/2]` tables of `dt` on `dev`, as f32.
fn device_tables(dt: DType, d: usize, theta: f64, dev: &Device) -> Vec<f32> {
    let b = POSITIONS.len();
    let t = Tensor::full(f32::NAN, (2, b, d / 2), dev)
        .unwrap()
        .to_dtype(dt)
        .unwrap();
    let p = Tensor::new(&POSITIONS, dev).unwrap();
    rope_tables_into(&t, &p, theta).unwrap();
    f32s(&t)
}

#[test]
fn rope_tables_into_matches_the_host_tables() {
    for (d, theta) in [(64, 100_000.0), (128, 500_000.0), (2, 10_000.0)] {
        for dt in DTYPES {
            let got = device_tables(dt, d, theta, &Device::Cpu);
            let (c, s) = rope_tables(&POSITIONS, d, theta, dt, &Device::Cpu).unwrap();
            let want = [f32s(&c), f32s(&s)].concat();
            assert_eq!(got, want, "D {d} {dt:?}");
        }
    }
    let p = Tensor::new(&POSITIONS, &Device::Cpu).unwrap();
    let bad = Tensor::zeros((2, 3, 32), DType::F32, &Device::Cpu).unwrap();
    let e = rope_tables_into(&bad, &p, 1e4).unwrap_err().to_string();
    assert!(
        e.contains("rope_tables_into") && e.contains("[2, 3, 32]") && e.contains("[9]"),
        "{e}"
    );
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_model_ops_match_the_cpu_ops() {
    let Some(gpu) = common::cuda_or_skip("cuda_model_ops_match_the_cpu_ops") else {
        return;
    };
    spinkv::ops::set_poison_outputs(true);
    for (i, &(t, h)) in SHAPES.iter().enumerate() {
        for dt in DTYPES {
            let [x, d, a, gu] = inputs(20 + i as u64, t, h, dt, &Device::Cpu);
            let [gx, gd, ga, ggu] = inputs(20 + i as u64, t, h, dt, &gpu);
            let what = format!("[{t}, {h}] {dt:?}");
            let (s, n) = add_rms_norm(&x, &d, &a, 1e-5).unwrap();
            let (gs, gn) = add_rms_norm(&gx, &gd, &ga, 1e-5).unwrap();
            assert_eq!(f32s(&gs), f32s(&s), "add_rms_norm sum {what}: exact");
            let want = |t: &Tensor| f32s(t).iter().map(|&v| v as f64).collect::<Vec<_>>();
            let e = row_err(&f32s(&gn), &want(&n), h);
            assert!(e <= tol(dt), "add_rms_norm {what}: {e}");
            // The same rows from a misaligned start (the scalar path): the same bits.
            let shifted = |v: &Tensor| {
                let pad = Tensor::zeros(3, dt, &gpu).unwrap();
                let flat = Tensor::cat(&[&pad, &v.flatten_all().unwrap()], 0).unwrap();
                flat.narrow(0, 3, t * h).unwrap().reshape((t, h)).unwrap()
            };
            let (ms, mn) = add_rms_norm(&shifted(&gx), &shifted(&gd), &ga, 1e-5).unwrap();
            assert_eq!(f32s(&ms), f32s(&s), "add_rms_norm sum {what}, misaligned: exact");
            let e = row_err(&f32s(&mn), &want(&n), h);
            assert!(e <= tol(dt), "add_rms_norm {what}, misaligned: {e}");
            let e = row_err(
                &f32s(&rms_norm(&gx, &ga, 1e-5).unwrap()),
                &want(&rms_norm(&x, &a, 1e-5).unwrap()),
                h,
            );
            assert!(e <= tol(dt), "rms_norm {what}: {e}");
            let want_silu = want(&silu_mul(&gu).unwrap());
            let e = row_err(&f32s(&silu_mul(&ggu).unwrap()), &want_silu, h);
            assert!(e <= tol(dt), "silu_mul {what}: {e}");
            // From a misaligned start (the one-element path).
            let pad = Tensor::zeros(3, dt, &gpu).unwrap();
            let flat = Tensor::cat(&[&pad, &ggu.flatten_all().unwrap()], 0).unwrap();
            let mgu = flat.narrow(0, 3, t * 2 * h).unwrap().reshape((t, 2 * h)).unwrap();
            let e = row_err(&f32s(&silu_mul(&mgu).unwrap()), &want_silu, h);
            assert!(e <= tol(dt), "silu_mul {what}, misaligned: {e}");
        }
    }
    for (ci, &c) in ROPE.iter().enumerate() {
        let (_, hq, hkv, _) = c;
        for dt in DTYPES {
            let (qkv, _, cos, sin) = rope_inputs(ci as u64, c, dt, &Device::Cpu);
            let (gqkv, _, gcos, gsin) = rope_inputs(ci as u64, c, dt, &gpu);
            let [q, k, v] = split(&qkv, hq, hkv);
            let [gq, gk, gv] = split(&gqkv, hq, hkv);
            let cpu = rope_qkv(&q, &k, &v, &cos, &sin).unwrap();
            let cuda = rope_qkv(&gq, &gk, &gv, &gcos, &gsin).unwrap();
            // Separately rounded products and sums on both: the same bits.
            for (a, b) in [(&cpu.0, &cuda.0), (&cpu.1, &cuda.1), (&cpu.2, &cuda.2)] {
                assert_eq!(f32s(b), f32s(a), "rope_qkv {c:?} {dt:?}");
            }
        }
    }
    // RoPE tables: within one ulp of the dtype (f64 sin/cos of two libms, then rounded).
    for (d, theta) in [(64, 100_000.0), (128, 500_000.0), (2, 10_000.0)] {
        for dt in DTYPES {
            let cpu = device_tables(dt, d, theta, &Device::Cpu);
            let cuda = device_tables(dt, d, theta, &gpu);
            let ulp = |x: f32| {
                // The spacing of `dt` at |x|: 2^(exponent - mantissa bits).
                let bits = match dt {
                    DType::F32 => 23,
                    DType::F16 => 10,
                    _ => 7,
                };
                2f32.powi(x.abs().max(1e-4).log2().floor() as i32 - bits)
            };
            for (i, (&a, &b)) in cpu.iter().zip(&cuda).enumerate() {
                assert!(
                    b.is_finite() && (a - b).abs() <= ulp(a),
                    "rope tables D {d} {dt:?} [{i}]: {a} vs {b}"
                );
            }
        }
    }
}
