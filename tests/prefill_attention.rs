//! `ops::prefill_attention` (a prefill chunk's queries over its earlier pages and,
//! causally, its own tokens, in one pass):
//! - its CPU reference against the composition it replaces — `sparse_paged_attention`
//!   over the page list merged with `causal_self_attention` over the chunk — on random
//!   inputs: ragged chunks starting off page boundaries, shuffled lists with NONE
//!   entries, GQA groups 1/3/4, page sizes 1/8/16 (f32, within 1e-4 absolute);
//! - each CUDA kernel (wgmma on a compute capability 9.0 device, with and without its
//!   warpgroup ping-pong, and mma.sync) against
//!   the CPU reference on poisoned outputs: bf16 and f16, head dims 64/96/128, groups
//!   1–8, page sizes 8–128, long prefixes, many tiles per chunk (out within 2e-2
//!   absolute for bf16 and 4e-3 for f16 — the kernel rounds the softmax weights to the
//!   storage type, as FlashAttention does — lse within 2e-3);
//! - rows no chunk covers come back empty (zeros, `EMPTY_LSE`), and bad inputs get
//!   errors that name the op.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use rand::seq::SliceRandom;
use rand::Rng;
use spinkv::ops::{self, PageList, PrefillChunk, PrefillTiles, EMPTY_LSE, NONE};

/// A random step: `chunks` prefill chunks `(start, n)` laid out one after the other,
/// plus `extra` rows that no chunk covers, over a pool of random pages.
struct Case {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pool: Tensor,
    pages: Tensor,
    kv_limit: Tensor,
    chunks: Vec<PrefillChunk>,
    group: usize,
    page_size: usize,
}

#[allow(clippy::too_many_arguments)]
fn case(seed: u64, chunks: &[(usize, usize)], extra: usize, hkv: usize, g: usize, d: usize, p: usize) -> Case {
    let mut r = rng(seed);
    let hq = hkv * g;
    let t: usize = chunks.iter().map(|c| c.1).sum::<usize>() + extra;
    let s = chunks.len();
    let lists: Vec<usize> = chunks.iter().map(|c| c.0.div_ceil(p)).collect();
    let n = lists.iter().copied().max().unwrap_or(0) + 2;
    let slots = s * hkv * n + 3;
    let mut free: Vec<u32> = (0..slots as u32).collect();
    free.shuffle(&mut r);
    let mut pages = vec![NONE; s * hkv * n * 2];
    for (si, &len) in lists.iter().enumerate() {
        for h in 0..hkv {
            let mut entries: Vec<(u32, u32)> = (0..len as u32).map(|lp| (free.pop().unwrap(), lp)).collect();
            entries.shuffle(&mut r);
            for (e, (slot, lp)) in entries.into_iter().enumerate() {
                // About one entry in nine is NONE (a page attended elsewhere).
                let slot = if r.random_range(0..9) == 0 { NONE } else { slot };
                let at = ((si * hkv + h) * n + e) * 2;
                pages[at] = slot;
                pages[at + 1] = lp;
            }
        }
    }
    let mut row = 0u32;
    let mut out = Vec::new();
    for (si, &(start, cn)) in chunks.iter().enumerate() {
        out.push(PrefillChunk {
            seq: si as u32,
            row,
            start: start as u32,
            n: cn as u32,
            list_len: n as u32,
        });
        row += cn as u32;
    }
    let limits: Vec<u32> = chunks.iter().map(|c| c.0 as u32).collect();
    Case {
        q: randn(&mut r, &[t, hq, d], 1.0),
        k: randn(&mut r, &[t, hkv, d], 1.0),
        v: randn(&mut r, &[t, hkv, d], 1.0),
        pool: randn(&mut r, &[slots, 2, p, d], 1.0),
        pages: Tensor::from_vec(pages, (s, hkv, n, 2), &Device::Cpu).unwrap(),
        kv_limit: Tensor::from_vec(limits, s, &Device::Cpu).unwrap(),
        chunks: out,
        group: g,
        page_size: p,
    }
}

fn run(c: &Case, dt: DType, dev: &Device) -> ops::AttentionPartial {
    let to = |x: &Tensor| x.to_dtype(dt).unwrap().to_device(dev).unwrap();
    let tiles = PrefillTiles::new(&c.chunks, c.group, c.page_size, dev).unwrap();
    let d = c.q.dims()[2];
    ops::prefill_attention(
        &to(&c.q),
        &to(&c.k),
        &to(&c.v),
        &to(&c.pool),
        &c.pages.to_device(dev).unwrap(),
        &c.kv_limit.to_device(dev).unwrap(),
        &tiles,
        1.0 / (d as f32).sqrt(),
    )
    .unwrap()
}

/// The composition the op replaces, for the covered rows (chunk by chunk).
fn composed(c: &Case) -> ops::AttentionPartial {
    let d = c.q.dims()[2];
    let scale = 1.0 / (d as f32).sqrt();
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for ch in &c.chunks {
        let rows = |x: &Tensor| x.narrow(0, ch.row as usize, ch.n as usize).unwrap();
        let queries: Vec<u32> = (0..ch.n).flat_map(|i| [ch.seq, ch.start + i]).collect();
        let list = PageList {
            pages: c.pages.clone(),
            queries: Tensor::from_vec(queries, (ch.n as usize, 2), &Device::Cpu).unwrap(),
            kv_limit: c.kv_limit.clone(),
        };
        let paged = ops::sparse_paged_attention(&rows(&c.q), &c.pool, &list, scale).unwrap();
        let own = ops::causal_self_attention(&rows(&c.q), &rows(&c.k), &rows(&c.v), scale).unwrap();
        let m = ops::merge_partials(&paged, &own).unwrap();
        outs.push(m.out);
        lses.push(m.lse);
    }
    ops::AttentionPartial {
        out: Tensor::cat(&outs, 0).unwrap(),
        lse: Tensor::cat(&lses, 0).unwrap(),
    }
}

/// `(chunks (start, n), Hkv, g, D, page size)`.
type Shape = (&'static [(usize, usize)], usize, usize, usize, usize);

fn covered(c: &Case) -> usize {
    c.chunks.iter().map(|ch| ch.n as usize).sum()
}

/// Rows past the chunks must be exactly empty.
fn assert_uncovered_empty(c: &Case, got: &ops::AttentionPartial) {
    let (t, from) = (got.out.dims()[0], covered(c));
    let out = f32s(&got.out.narrow(0, from, t - from).unwrap());
    let lse = f32s(&got.lse.narrow(0, from, t - from).unwrap());
    assert!(out.iter().all(|&x| x == 0.0), "uncovered rows must be zeros");
    assert!(
        lse.iter().all(|&x| x == EMPTY_LSE),
        "uncovered rows must have EMPTY_LSE"
    );
}

#[test]
fn reference_matches_paged_plus_causal_composition() {
    let shapes: [Shape; 5] = [
        (&[(0, 37)], 1, 3, 16, 8),
        (&[(21, 19), (0, 5), (40, 1)], 2, 3, 8, 16),
        (&[(5, 70)], 1, 4, 32, 1),
        (&[(33, 9), (64, 30)], 3, 1, 8, 8),
        (&[(100, 66)], 2, 2, 24, 16),
    ];
    for (i, (chunks, hkv, g, d, p)) in shapes.into_iter().enumerate() {
        let c = case(100 + i as u64, chunks, 3, hkv, g, d, p);
        let got = run(&c, DType::F32, &Device::Cpu);
        let want = composed(&c);
        let n = covered(&c);
        let out = max_abs_diff(&got.out.narrow(0, 0, n).unwrap(), &want.out);
        let lse = max_abs_diff(&got.lse.narrow(0, 0, n).unwrap(), &want.lse);
        assert!(out < 1e-4 && lse < 1e-4, "case {i}: out {out:e}, lse {lse:e}");
        assert_uncovered_empty(&c, &got);
    }
}

#[test]
fn cuda_kernel_matches_reference() {
    let Some(gpu) = cuda_or_skip("cuda_kernel_matches_reference") else {
        return;
    };
    #[cfg(feature = "cuda")]
    ops::set_poison_outputs(true);
    let shapes: [Shape; 9] = [
        (&[(0, 37)], 1, 3, 64, 16),
        (&[(2011, 333)], 2, 4, 128, 16),
        (&[(0, 700), (515, 257)], 1, 3, 64, 32),
        (&[(21, 19), (0, 5), (40, 1)], 2, 3, 64, 8),
        (&[(300, 200)], 2, 4, 128, 16),
        (&[(33, 90), (777, 64)], 3, 1, 96, 32),
        (&[(130, 66)], 1, 8, 128, 128),
        (&[(1000, 129)], 1, 2, 64, 16),
        (&[(0, 250), (17, 3)], 2, 5, 128, 8),
    ];
    // (wgmma, ping-pong): the Hopper kernel both ways where it runs, and mma.sync.
    let kernels: &[(bool, bool)] = if cfg!(feature = "cuda") {
        &[(true, false), (true, true), (false, false)]
    } else {
        &[(true, false)]
    };
    #[cfg(feature = "cuda")]
    use ops::PrefillPingPong::{Always, Never};
    for (i, (chunks, hkv, g, d, p)) in shapes.into_iter().enumerate() {
        let c = case(200 + i as u64, chunks, 2, hkv, g, d, p);
        for (&(wgmma, pingpong), (dt, tol)) in kernels
            .iter()
            .flat_map(|w| [(w, (DType::BF16, 2e-2)), (w, (DType::F16, 4e-3))])
        {
            #[cfg(feature = "cuda")]
            {
                ops::set_prefill_wgmma(wgmma);
                ops::set_prefill_pingpong(if pingpong { Always } else { Never });
            }
            // The reference sees the same rounded inputs.
            let rounded = Case {
                q: c.q.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap(),
                k: c.k.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap(),
                v: c.v.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap(),
                pool: c.pool.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap(),
                pages: c.pages.clone(),
                kv_limit: c.kv_limit.clone(),
                chunks: c.chunks.clone(),
                group: c.group,
                page_size: c.page_size,
            };
            let want = run(&rounded, DType::F32, &Device::Cpu);
            let got = run(&c, dt, &gpu);
            let got = ops::AttentionPartial {
                out: got.out.to_device(&Device::Cpu).unwrap(),
                lse: got.lse.to_device(&Device::Cpu).unwrap(),
            };
            let out = max_abs_diff(&got.out, &want.out);
            let lse = max_abs_diff(&got.lse, &want.lse);
            assert!(
                out < tol && lse < 2e-3,
                "case {i} {dt:?} wgmma {wgmma} ping-pong {pingpong} (chunks {chunks:?}, hkv {hkv}, g {g}, d {d}, p {p}): out {out:e}, lse {lse:e}"
            );
            assert_uncovered_empty(&c, &got);
        }
    }
}

#[test]
fn bad_inputs_name_the_op() {
    let c = case(7, &[(10, 12)], 0, 2, 3, 16, 8);
    let cpu = Device::Cpu;
    let scale = 0.25;
    let tiles = PrefillTiles::new(&c.chunks, 3, 8, &cpu).unwrap();
    let call = |q: &Tensor, k: &Tensor, tiles: &PrefillTiles| {
        ops::prefill_attention(q, k, &c.v, &c.pool, &c.pages, &c.kv_limit, tiles, scale)
            .unwrap_err()
            .to_string()
    };
    // A GQA group other than the tiles'.
    let wrong_group = PrefillTiles::new(&c.chunks, 2, 8, &cpu).unwrap();
    assert!(call(&c.q, &c.k, &wrong_group).contains("prefill_attention"));
    // k of the wrong head dim.
    let k_bad = Tensor::zeros((12, 2, 8), DType::F32, &cpu).unwrap();
    let e = call(&c.q, &k_bad, &tiles);
    assert!(e.contains("prefill_attention") && e.contains("[12, 2, 8]"), "{e}");
    // Tiles past the step's rows.
    let long = PrefillTiles::new(&[PrefillChunk { n: 13, ..c.chunks[0] }], 3, 8, &cpu).unwrap();
    assert!(call(&c.q, &c.k, &long).contains("step rows"));
    // Chunks without tokens and groups over a tile are refused when tiling.
    let empty = PrefillChunk { n: 0, ..c.chunks[0] };
    assert!(PrefillTiles::new(&[empty], 3, 8, &cpu).is_err());
    assert!(PrefillTiles::new(&c.chunks, ops::PREFILL_ROWS + 1, 8, &cpu).is_err());
    // A u32 tensor as queries.
    let q_u32 = Tensor::zeros((12, 6, 16), DType::U32, &cpu).unwrap();
    assert!(call(&q_u32, &c.k, &tiles).contains("prefill_attention"));
}

#[test]
fn tiles_say_where_most_keys_are_earlier_pages() {
    let cpu = Device::Cpu;
    let chunk = |start: u32, n: u32, list_len: u32| PrefillChunk {
        seq: 0,
        row: 0,
        start,
        n,
        list_len,
    };
    let mostly = |chunks: &[PrefillChunk]| PrefillTiles::new(chunks, 4, 16, &cpu).unwrap().mostly_earlier_pages();
    // A prompt's first chunk walks only its own tokens.
    assert!(!mostly(&[chunk(0, 8192, 0)]));
    // Its second 8K chunk: 8K earlier keys per tile against 16 to 8K own ones.
    assert!(mostly(&[chunk(8192, 8192, 512)]));
    // A short prefix under a long chunk: own keys dominate (tiles of 32 tokens, own
    // keys 32 + 64 + … + 8192 = 1,052,672 against 256 × 256 = 65,536 earlier ones).
    assert!(!mostly(&[chunk(256, 8192, 16)]));
    // Summed over a launch's chunks.
    assert!(mostly(&[chunk(0, 64, 0), chunk(65536, 64, 4096)]));
}
