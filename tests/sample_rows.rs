//! `sample_rows`, the device sampler: greedy rows take the first largest logit (NaN
//! skipped); sampled rows follow the renormalized softmax of the tokens that survive the
//! top-k and top-p cuts, checked by frequency over 40 000 counters against the plain f64
//! probabilities written here (every count within 5 standard deviations, no token outside
//! the cuts); draws are a function of (seed, counter) alone; `sample_rows_into` writes
//! the same ids into a poisoned buffer. With the `cuda` feature the
//! kernel must pick the same token as the CPU reference for every row of random logits
//! (odd vocabularies up to 49 152, mixed settings), into poisoned outputs.

mod common;

use candle_core::{Device, Tensor};
use common::{randn, rng, u32s};
use spinkv::ops::{sample_params, sample_rows, sample_rows_into, SampleRow};

fn row(temperature: f32, top_k: u32, top_p: f32, seed: u64, counter: u32) -> SampleRow {
    SampleRow {
        temperature,
        top_k,
        top_p,
        seed,
        counter,
    }
}

fn draw(logits: &Tensor, rows: &[SampleRow]) -> Vec<u32> {
    u32s(&sample_rows(logits, &sample_params(rows, logits.device()).unwrap()).unwrap())
}

#[test]
fn greedy_rows_take_the_first_largest_logit() {
    let l = Tensor::new(
        &[
            [0.0f32, 5.0, 1.0, 5.0],
            [f32::NAN, -1.0, f32::NAN, -2.0],
            [1.0, 1.0, 1.2, 0.0],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let g = row(0.0, 0, 1.0, 1, 0);
    assert_eq!(draw(&l, &[g, g, g]), vec![1, 1, 2]);
    // top_k = 1 at any temperature is greedy.
    let k1 = row(3.0, 1, 0.5, 9, 4);
    assert_eq!(draw(&l, &[k1, k1, k1]), vec![1, 1, 2]);
}

/// The probabilities the cuts leave (plain f64; the cuts as the module docs state them).
fn expected(l: &[f32], t: f32, k: usize, p: f64) -> Vec<f64> {
    let z: Vec<f64> = l.iter().map(|&x| (x * (1.0 / t)) as f64).collect();
    let mut order: Vec<usize> = (0..z.len()).collect();
    order.sort_by(|&a, &b| z[b].total_cmp(&z[a]));
    let kth = if k > 0 && k < z.len() {
        z[order[k - 1]]
    } else {
        f64::NEG_INFINITY
    };
    let m = z[order[0]];
    let w: Vec<f64> = z.iter().map(|&x| if x >= kth { (x - m).exp() } else { 0.0 }).collect();
    let total: f64 = w.iter().sum();
    let mut cut = kth;
    let mut c = 0.0;
    for &i in &order {
        c += w[i];
        if w[i] > 0.0 && c >= p * total {
            cut = cut.max(z[i]);
            break;
        }
    }
    let kept: Vec<f64> = z
        .iter()
        .zip(&w)
        .map(|(&x, &wi)| if x >= cut { wi } else { 0.0 })
        .collect();
    let s: f64 = kept.iter().sum();
    kept.iter().map(|x| x / s).collect()
}

#[test]
fn draws_follow_the_cut_softmax() {
    let l = [2.0f32, 1.0, 0.5, -1.0, 1.5, -3.0, 0.0];
    let n = 40_000;
    for (t, k, p) in [
        (1.0f32, 0u32, 1.0f32),
        (0.7, 4, 1.0),
        (1.3, 0, 0.8),
        (0.9, 5, 0.9),
        (2.0, 3, 0.3),
    ] {
        let logits = Tensor::from_vec(l.repeat(n), (n, l.len()), &Device::Cpu).unwrap();
        let rows: Vec<SampleRow> = (0..n as u32).map(|c| row(t, k, p, 42, c)).collect();
        let mut counts = vec![0usize; l.len()];
        for id in draw(&logits, &rows) {
            counts[id as usize] += 1;
        }
        let want = expected(&l, t, k as usize, p as f64);
        for (i, (&got, &q)) in counts.iter().zip(&want).enumerate() {
            let mean = q * n as f64;
            let sd = (n as f64 * q * (1.0 - q)).sqrt();
            let what = format!("T {t} k {k} p {p} token {i}: {got} draws, expected {mean:.0}");
            if q == 0.0 {
                assert_eq!(got, 0, "{what}");
            } else {
                assert!((got as f64 - mean).abs() <= 5.0 * sd + 1.0, "{what}");
            }
        }
    }
}

#[test]
fn draws_depend_on_seed_and_counter_only() {
    let mut r = rng(3);
    let l = randn(&mut r, &[3, 1000], 2.0);
    let a = [
        row(1.0, 50, 0.95, 7, 0),
        row(1.0, 50, 0.95, 7, 1),
        row(1.0, 50, 0.95, 8, 0),
    ];
    let first = draw(&l, &a);
    assert_eq!(first, draw(&l, &a));
    // Row 0 alone, and beside other rows in another order: the same token.
    let alone = draw(&l.narrow(0, 0, 1).unwrap(), &a[..1]);
    assert_eq!(alone[0], first[0]);
    let swapped = Tensor::cat(&[l.get(2).unwrap(), l.get(0).unwrap()], 0)
        .unwrap()
        .reshape((2, 1000))
        .unwrap();
    assert_eq!(draw(&swapped, &[a[2], a[0]]), vec![first[2], first[0]]);
    // Counters move the draw: 64 counters give many tokens.
    let many: std::collections::HashSet<u32> = (0..64)
        .map(|c| draw(&l.narrow(0, 0, 1).unwrap(), &[row(1.0, 0, 1.0, 7, c)])[0])
        .collect();
    assert!(many.len() > 20, "{}", many.len());
}

/// `sample_rows_into` over a buffer poisoned with `NONE`: the `sample_rows` ids.
fn check_into(l: &Tensor, rows: &[SampleRow]) {
    let p = sample_params(rows, l.device()).unwrap();
    let out = Tensor::full(spinkv::ops::NONE, rows.len(), l.device()).unwrap();
    sample_rows_into(l, &p, &out).unwrap();
    assert_eq!(u32s(&out), draw(l, rows));
}

#[test]
fn sampling_into_a_buffer_draws_the_same_ids() {
    let mut r = rng(5);
    let l = randn(&mut r, &[5, 333], 2.0);
    let rows: Vec<SampleRow> = (0..5).map(|i| row(0.5 * i as f32, 7 * i, 0.8, 3, i)).collect();
    check_into(&l, &rows);
    let p = sample_params(&rows, &Device::Cpu).unwrap();
    let bad = Tensor::zeros(4, candle_core::DType::U32, &Device::Cpu).unwrap();
    let e = sample_rows_into(&l, &p, &bad).unwrap_err().to_string();
    assert!(
        e.contains("sample_rows") && e.contains("[5]") && e.contains("[4]"),
        "{e}"
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let l = Tensor::zeros((2, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
    let p = sample_params(&[row(1.0, 0, 1.0, 0, 0)], &Device::Cpu).unwrap();
    let e = sample_rows(&l, &p).unwrap_err().to_string();
    assert!(
        e.contains("sample_rows") && e.contains("[2, 5]") && e.contains("[1, 6]"),
        "{e}"
    );
    let h = l.to_dtype(candle_core::DType::F16).unwrap();
    let p2 = sample_params(&[row(1.0, 0, 1.0, 0, 0); 2], &Device::Cpu).unwrap();
    assert!(sample_rows(&h, &p2).is_err());
    assert_eq!(draw(&l.narrow(0, 0, 0).unwrap(), &[]), Vec::<u32>::new());
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_sampler_matches_the_cpu_reference() {
    let Some(gpu) = common::cuda_or_skip("cuda_sampler_matches_the_cpu_reference") else {
        return;
    };
    spinkv::ops::set_poison_outputs(true);
    let mut r = rng(11);
    for v in [1usize, 7, 4099, 49_152] {
        let b = 37;
        let l = randn(&mut r, &[b, v], 3.0);
        let rows: Vec<SampleRow> = (0..b as u32)
            .map(|i| match i % 6 {
                0 => row(0.0, 0, 1.0, 1, i),
                1 => row(1.0, 0, 1.0, 2, i),
                2 => row(0.6, 40, 1.0, 3, i),
                3 => row(1.2, 0, 0.9, 4, i),
                4 => row(0.8, 100, 0.7, 5, i),
                _ => row(1.0, 1, 1.0, 6, i),
            })
            .collect();
        let cpu = draw(&l, &rows);
        let gl = l.to_device(&gpu).unwrap();
        let cuda = draw(&gl, &rows);
        assert_eq!(cuda, cpu, "V {v}");
        check_into(&gl, &rows);
    }
}
