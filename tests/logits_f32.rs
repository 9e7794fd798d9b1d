//! [`logits_f32`] (the output projection with f32 logits) against a plain f64 evaluation
//! of the same rounded inputs, on random inputs of odd sizes, in f32, f16 and bf16. The
//! products of the inputs are exact in f64 and the op accumulates them in f32, so the
//! tolerance is f32 accumulation's: 1e-5 of the row's largest `Σ |x·w|`. With the `cuda`
//! feature the same cases run on GPU 0 (cuBLAS `GemmEx`) over a poisoned output buffer.
//! Bad shapes get an error naming the op and the shapes.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{f32s, randn, rng};
use spinkv::ops::logits_f32;

/// (rows, hidden, vocab): one row, odd sizes, a batch of a decode step.
const SHAPES: [(usize, usize, usize); 5] = [(1, 1, 1), (1, 64, 37), (3, 577, 1001), (17, 576, 4099), (64, 256, 515)];
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// `(x, w)` in `dt` on `dev` (the same values on every device for one seed).
fn inputs(seed: u64, t: usize, h: usize, v: usize, dt: DType, dev: &Device) -> (Tensor, Tensor) {
    let mut r = rng(seed);
    let mut mk = |dims: &[usize]| randn(&mut r, dims, 1.0).to_dtype(dt).unwrap().to_device(dev).unwrap();
    (mk(&[t, h]), mk(&[v, h]))
}

/// Max over rows of max |got − want| / (the row's largest Σ|x·w| + 1e-30), against the
/// f64 evaluation of the rounded inputs.
fn err(x: &Tensor, w: &Tensor, got: &Tensor) -> f64 {
    let (t, h) = x.dims2().unwrap();
    let v = w.dims()[0];
    let (x, w, got) = (f32s(x), f32s(w), f32s(got));
    let mut worst = 0f64;
    for i in 0..t {
        let xr = &x[i * h..(i + 1) * h];
        let (mut scale, mut e) = (1e-30f64, 0f64);
        for j in 0..v {
            let wr = &w[j * h..(j + 1) * h];
            let want: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
            scale = scale.max(xr.iter().zip(wr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum());
            e = e.max((got[i * v + j] as f64 - want).abs());
        }
        worst = worst.max(e / scale);
    }
    worst
}

#[test]
fn logits_match_the_f64_evaluation() {
    for (i, &(t, h, v)) in SHAPES.iter().enumerate() {
        for dt in DTYPES {
            let (x, w) = inputs(i as u64, t, h, v, dt, &Device::Cpu);
            let got = logits_f32(&x, &w).unwrap();
            let what = format!("logits_f32 [{t}, {h}] x [{v}, {h}] {dt:?}");
            assert_eq!((got.dims(), got.dtype()), (&[t, v][..], DType::F32), "{what}");
            let e = err(&x, &w, &got);
            assert!(e <= 1e-5, "{what}: {e}");
        }
    }
    // A strided x (a transposed view) is made contiguous first.
    let (x, w) = inputs(9, 5, 33, 7, DType::F32, &Device::Cpu);
    let xt = x.t().unwrap().contiguous().unwrap().t().unwrap();
    assert_eq!(f32s(&logits_f32(&xt, &w).unwrap()), f32s(&logits_f32(&x, &w).unwrap()));
}

#[test]
fn bad_inputs_are_rejected_with_their_shapes() {
    let d = Device::Cpu;
    let x = Tensor::zeros((3, 8), DType::F32, &d).unwrap();
    let e = logits_f32(&x, &Tensor::zeros((5, 7), DType::F32, &d).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("logits_f32") && e.contains("[5, 7]") && e.contains("[3, 8]"),
        "{e}"
    );
    let e = logits_f32(&x, &Tensor::zeros((5, 8), DType::BF16, &d).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("logits_f32") && e.contains("BF16"), "{e}");
    assert!(logits_f32(&x, &Tensor::zeros(8, DType::F32, &d).unwrap()).is_err());
    assert!(logits_f32(&Tensor::zeros(8, DType::F32, &d).unwrap(), &x).is_err());
    assert!(logits_f32(&Tensor::zeros((3, 8), DType::U32, &d).unwrap(), &x).is_err());
    // Zero rows are fine.
    let empty = Tensor::zeros((0, 8), DType::F32, &d).unwrap();
    assert_eq!(logits_f32(&empty, &x).unwrap().dims(), [0, 3]);
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_logits_match_the_f64_evaluation() {
    let Some(gpu) = common::cuda_or_skip("cuda_logits_match_the_f64_evaluation") else {
        return;
    };
    spinkv::ops::set_poison_outputs(true);
    for (i, &(t, h, v)) in SHAPES.iter().enumerate() {
        for dt in DTYPES {
            let (x, w) = inputs(i as u64, t, h, v, dt, &gpu);
            let got = logits_f32(&x, &w).unwrap();
            let what = format!("cuda logits_f32 [{t}, {h}] x [{v}, {h}] {dt:?}");
            assert_eq!((got.dims(), got.dtype()), (&[t, v][..], DType::F32), "{what}");
            // cuBLAS may run f32 inputs through TF32 only if asked; it is not.
            let e = err(&x, &w, &got);
            assert!(e <= 1e-5, "{what}: {e}");
        }
    }
}
