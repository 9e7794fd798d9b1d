//! InfLLM's device ops (`spinkv::ops::infllm`) on CUDA against their CPU reference. A
//! CPU run of several owners (prefill runs up to the round cap, then decode runs of one
//! token, padding runs among them) builds the state; at every call each op starts from a
//! copy of the CPU state on the GPU, and its result is compared with the CPU's. Fresh
//! outputs are poisoned (NaN / NONE) before the kernels run.
//!
//! Tolerances: ring writes, slots, undo planes, restores, representatives, pages and
//! top-k bit-exact; masses within 2e-5·(1 + |x|) and block scores within 1e-4·(1 + |x|) (f32
//! summation order).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use rand::Rng;
use spinkv::ops::{self, InfLlmGeometry, NONE};
use spinkv::partition::TokenRun;

fn gpu() -> Device {
    ops::set_poison_outputs(true);
    Device::new_cuda(0).expect("a CUDA device")
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let ok = (x == y) || (x - y).abs() <= tol * (1.0 + x.abs());
        assert!(ok, "{what}[{i}]: cpu {x} vs cuda {y}");
    }
}

/// Slot and flag planes as bits, mass and undo planes as f32, of `[S, 4, ring, Hkv]` u32.
fn planes(m: &Tensor) -> (Vec<u32>, Vec<f32>) {
    let v = u32s(m);
    let (s, _, w, h) = m.dims4().unwrap();
    let plane = w * h;
    let (mut exact, mut mass) = (Vec::new(), Vec::new());
    for o in 0..s {
        let base = o * 4 * plane;
        exact.extend_from_slice(&v[base..base + plane]);
        exact.extend_from_slice(&v[base + 3 * plane..base + 4 * plane]);
        mass.extend(v[base + plane..base + 2 * plane].iter().map(|&b| f32::from_bits(b)));
        mass.extend(v[base + 2 * plane..base + 3 * plane].iter().map(|&b| f32::from_bits(b)));
    }
    (exact, mass)
}

#[test]
fn infllm_ops_match_cpu() {
    let dev = gpu();
    for (dt, d, hkv, g, p) in [
        (DType::F32, 40usize, 3usize, 2usize, 4usize),
        (DType::BF16, 128, 2, 4, 8),
        // Rows of 72 bytes: the kernels' scalar path (no 16-byte loads).
        (DType::F16, 36, 2, 3, 4),
    ] {
        let geo = InfLlmGeometry {
            window: 12,
            block: 2 * p,
            repr: 3,
            page_size: p,
            sink_pages: 1,
            ring: 12 + 2 * p + 9,
        };
        let (s, hq) = (5usize, hkv * g);
        let slots = s * hkv * 64;
        let kpp = geo.keys_per_page();
        let mut r = rng(17 + d as u64);
        let cpu = Device::Cpu;
        let garbage = |r: &mut rand::rngs::StdRng, dims: &[usize]| randn(r, dims, 1.0).to_dtype(dt).unwrap();
        let ring_k = garbage(&mut r, &[s, geo.ring, hkv, d]);
        let ring_m = Tensor::zeros((s, 4, geo.ring, hkv), DType::U32, &cpu).unwrap();
        let repr = garbage(&mut r, &[slots, kpp, d]);
        // Owners 0, 2, 3 (1 and 4 idle), each with its own page slots.
        let owners = [0u32, 2, 3];
        let slot = |o: u32, h: usize, page: usize| ((o as usize * hkv + h) * 64 + page) as u32;
        let mut lens = [0usize; 3];
        let cap = geo.max_run();
        let plans: Vec<Vec<usize>> = vec![vec![cap, 3, cap, 1], vec![5, cap, cap, 1], vec![cap, cap, cap, 2]];
        let steps = plans[0].len() + 30;
        for step in 0..steps {
            // Every owner adds a run: its plan first, then decode tokens; one padding run.
            let mut runs = Vec::new();
            let mut row = 0;
            for (i, &o) in owners.iter().enumerate() {
                let n = plans[i].get(step).copied().unwrap_or(1);
                runs.push(TokenRun {
                    seq: i as u64,
                    start: lens[i],
                    n,
                    row,
                    owner: o,
                });
                row += n;
            }
            let t = row;
            let mut table = u32s(&TokenRun::table(&runs, &cpu).unwrap());
            table.extend_from_slice(&[1, 0, 0, 0]); // padding
            let table = Tensor::from_vec(table, (runs.len() + 1, 4), &cpu).unwrap();
            let q = garbage(&mut r, &[t, hq, d]);
            let k = garbage(&mut r, &[t, hkv, d]);
            let mut dst = vec![NONE; t * hkv];
            for (ru, i) in runs.iter().zip(0..) {
                for j in 0..ru.n {
                    let pos = ru.start + j;
                    for h in 0..hkv {
                        if r.random_range(0..23) != 0 {
                            dst[(ru.row + j) * hkv + h] = slot(owners[i], h, pos / p) * p as u32 + (pos % p) as u32;
                        }
                    }
                }
            }
            let dst = Tensor::from_vec(dst, (t, hkv), &cpu).unwrap();
            let max_n = runs.iter().map(|x| x.n).max().unwrap();
            let on = |x: &Tensor| x.to_device(&dev).unwrap();
            let what = format!("{dt:?} step {step}");

            // Ring write.
            let (gk, gm) = (on(&ring_k), on(&ring_m));
            ops::infllm_ring_write(&gk, &gm, &on(&k), &on(&dst), &on(&table), p).unwrap();
            ops::infllm_ring_write(&ring_k, &ring_m, &k, &dst, &table, p).unwrap();
            assert_eq!(
                bits(&gk.to_dtype(DType::F32).unwrap()),
                bits(&ring_k.to_dtype(DType::F32).unwrap()),
                "{what}: ring keys"
            );
            assert_eq!(u32s(&gm), u32s(&ring_m), "{what}: ring metadata");

            // Window mass.
            let gm = on(&ring_m);
            ops::infllm_window_mass(&gm, &on(&ring_k), &on(&q), &on(&table), (geo.window, 0.3), max_n).unwrap();
            ops::infllm_window_mass(&ring_m, &ring_k, &q, &table, (geo.window, 0.3), max_n).unwrap();
            let ((ce, cm), (ge, gmv)) = (planes(&ring_m), planes(&gm));
            assert_eq!(ce, ge, "{what}: slots");
            close(&cm, &gmv, 2e-5, &format!("{what}: masses"));

            // Finalize (from the CPU masses on both sides).
            let grep = on(&repr);
            ops::infllm_finalize(&grep, &on(&ring_k), &on(&ring_m), &on(&table), &geo, max_n).unwrap();
            ops::infllm_finalize(&repr, &ring_k, &ring_m, &table, &geo, max_n).unwrap();
            assert_eq!(
                bits(&grep.to_dtype(DType::F32).unwrap()),
                bits(&repr.to_dtype(DType::F32).unwrap()),
                "{what}: repr"
            );
            // Restore (an aborted step): owner 2's latest write, and a start no write had.
            if step % 7 == 3 {
                let gm = on(&ring_m);
                for (o, start) in [(2u32, lens[1]), (3, lens[2] + 1)] {
                    ops::infllm_restore(&gm, o, start).unwrap();
                    ops::infllm_restore(&ring_m, o, start).unwrap();
                }
                assert_eq!(u32s(&gm), u32s(&ring_m), "{what}: restore");
            }
            for (i, ru) in runs.iter().enumerate() {
                lens[i] += ru.n;
            }

            // Select for a decode query per owner (plus a padding row), over candidates
            // with NONE past each row's pages.
            let nmax = lens.iter().map(|&l| (l + 1).div_ceil(p)).max().unwrap() + 3;
            let b = owners.len() + 1;
            let mut cand = vec![NONE; b * hkv * nmax];
            let mut rows = Vec::new();
            for (i, &o) in owners.iter().enumerate() {
                for h in 0..hkv {
                    for j in 0..(lens[i] + 1).div_ceil(p) {
                        cand[(i * hkv + h) * nmax + j] = slot(o, h, j);
                    }
                }
                rows.extend_from_slice(&[o, lens[i] as u32, 1, i as u32]);
            }
            rows.extend_from_slice(&[4, 50, 0, 3]);
            let cand = Tensor::from_vec(cand, (b, hkv, nmax), &cpu).unwrap();
            let rows = Tensor::from_vec(rows, (b, 4), &cpu).unwrap();
            let qd = garbage(&mut r, &[b, hq, d]);
            let cs = ops::infllm_block_scores(&qd, &repr, &cand, &rows, &geo).unwrap();
            let gs = ops::infllm_block_scores(&on(&qd), &on(&repr), &on(&cand), &on(&rows), &geo).unwrap();
            close(&f32s(&cs), &f32s(&gs), 1e-4, &format!("{what}: block scores"));
            let top = ops::topk_indices(&cs, 2).unwrap();
            let cp = ops::infllm_pages(&top, &rows, &geo, hkv).unwrap();
            let gp = ops::infllm_pages(&on(&top), &on(&rows), &geo, hkv).unwrap();
            assert_eq!(u32s(&cp), u32s(&gp), "{what}: pages");
        }
    }
}

/// `infllm_mass_add` (the prefill's batched masses into the ring) against the CPU, with
/// a key range that wraps around the ring.
#[test]
fn mass_add_matches_cpu() {
    let dev = gpu();
    let mut r = rng(3);
    let (s, w, h) = (3usize, 37usize, 5usize);
    let init: Vec<u32> = (0..s * 4 * w * h)
        .map(|_| r.random_range(-2.0f32..2.0).to_bits())
        .collect();
    let ring = Tensor::from_vec(init, (s, 4, w, h), &Device::Cpu).unwrap();
    for (owner, first, l) in [(1u32, 30usize, 20usize), (2, 0, 37), (0, 74, 1)] {
        let add = randn(&mut r, &[l, h], 1.0);
        let g = ring.to_device(&dev).unwrap();
        ops::infllm_mass_add(&g, &add.to_device(&dev).unwrap(), owner, first).unwrap();
        ops::infllm_mass_add(&ring, &add, owner, first).unwrap();
        assert_eq!(u32s(&g), u32s(&ring), "owner {owner}, first {first}, {l} keys");
    }
}

/// `infllm_window_mass` over windows longer than a thread block (wrapping around the
/// ring), five query heads per KV head, runs of 1 and 3 tokens and a padding run, against
/// the CPU. A window of 300 keys keeps the decode kernel's scores in shared memory
/// between its passes; one of 2600 (52 KB of scores) has them scored again.
#[test]
fn window_mass_over_long_windows_matches_cpu() {
    let dev = gpu();
    let mut r = rng(29);
    let (s, hkv, g) = (3usize, 2usize, 5usize);
    // (window, ring, start of the single-token run)
    for (window, ring, at) in [(300usize, 333usize, 500u32), (2600, 2650, 3000)] {
        // 72-dim rows load 16 bytes at a time; 36-dim f16 rows (72 bytes) take the scalar path.
        for (dt, d) in [(DType::F32, 72usize), (DType::BF16, 72), (DType::F16, 36)] {
            let what = format!("window {window}, {dt:?}, D {d}");
            let ring_k = randn(&mut r, &[s, ring, hkv, d], 1.0).to_dtype(dt).unwrap();
            let init: Vec<u32> = (0..s * 4 * ring * hkv)
                .map(|_| r.random_range(0.0f32..2.0).to_bits())
                .collect();
            let ring_m = Tensor::from_vec(init, (s, 4, ring, hkv), &Device::Cpu).unwrap();
            let q = randn(&mut r, &[4, hkv * g, d], 1.0).to_dtype(dt).unwrap();
            // (owner, start, n, row): 1 token at `at`, 3 tokens at 290 (windows from 0), padding.
            let all = vec![2u32, at, 1, 0, 0, 290, 3, 1, 1, 0, 0, 0];
            let table = Tensor::from_vec(all, (3, 4), &Device::Cpu).unwrap();
            // max_n = 3 takes the CUDA path for runs of several tokens (a warp per query,
            // then per key); the single-token run alone, with max_n = 1, the decode kernel.
            let single = Tensor::from_vec(vec![2u32, at, 1, 0], (1, 4), &Device::Cpu).unwrap();
            for (table, max_n) in [(&table, 3usize), (&single, 1)] {
                let ring_m = ring_m.copy().unwrap();
                let before = u32s(&ring_m);
                let gm = ring_m.to_device(&dev).unwrap();
                let on = |x: &Tensor| x.to_device(&dev).unwrap();
                ops::infllm_window_mass(&gm, &on(&ring_k), &on(&q), &on(table), (window, 0.2), max_n).unwrap();
                ops::infllm_window_mass(&ring_m, &ring_k, &q, table, (window, 0.2), max_n).unwrap();
                let ((ce, cm), (ge, gmv)) = (planes(&ring_m), planes(&gm));
                assert_eq!(ce, ge, "{what}, max_n {max_n}: slots");
                close(&cm, &gmv, 2e-5, &format!("{what}, max_n {max_n}: masses"));
                assert_ne!(u32s(&ring_m), before, "{what}, max_n {max_n}: the masses moved");
            }
        }
    }
}

/// `infllm_pages` for any chosen blocks: repeats, `NONE`, blocks past the finalized ones,
/// blocks inside the sink, rows of every length and padding rows, against the CPU.
#[test]
fn pages_match_cpu_for_any_top() {
    let dev = gpu();
    let mut r = rng(31);
    let geo = InfLlmGeometry {
        window: 40,
        block: 16,
        repr: 2,
        page_size: 8,
        sink_pages: 3,
        ring: 40 + 16 + 9,
    };
    for (b, k) in [(1usize, 1usize), (7, 5), (33, 40)] {
        let mut rows = Vec::new();
        for i in 0..b {
            let live = u32::from(i % 5 != 4);
            rows.extend_from_slice(&[i as u32, r.random_range(0..700u32), live, i as u32]);
        }
        let top: Vec<u32> = (0..b * k)
            .map(|_| match r.random_range(0..6) {
                0 => NONE,
                1 => r.random_range(0..3u32),
                _ => r.random_range(0..45u32),
            })
            .collect();
        let top = Tensor::from_vec(top, (b, k), &Device::Cpu).unwrap();
        let rows = Tensor::from_vec(rows, (b, 4), &Device::Cpu).unwrap();
        let cp = ops::infllm_pages(&top, &rows, &geo, 3).unwrap();
        let gp = ops::infllm_pages(&top.to_device(&dev).unwrap(), &rows.to_device(&dev).unwrap(), &geo, 3).unwrap();
        assert_eq!(u32s(&cp), u32s(&gp), "B = {b}, k = {k}");
    }
}
