//! ShadowKV against its paper's criterion, written from scratch here in f64: at a
//! sequence's first decode step its prefill's full chunks are compressed; a chunk's
//! landmark is the mean of its post-RoPE keys (RoPE of the pre-RoPE keys at their
//! positions, "rotate half"); per KV head the `outlier_chunks` chunks with the lowest
//! minimum cosine similarity of a key to its landmark stay exact. At every decode step,
//! per KV head: the outliers before the exact region, the top `sparse_budget / chunk`
//! other chunks by `max over the group's query heads of softmax(q · landmarkᵀ / √D)`
//! (ties to the lower chunk), and every page from the exact region on (the window and
//! the tokens after the compressed chunks).
//!
//! The algorithm is driven directly on random inputs: its outlier flags and its selected
//! pages must equal the reference's, at the first decode step and at later ones, in both
//! of its modes (device mode: a fast tier holding every page; host mode: a smaller one).

mod common;

use candle_core::{DType, Tensor};
use common::algo::{index_runs, run, select_pages};
use common::*;
use spinkv::partition::{ShadowKv, ShadowKvConfig, SparseAlgorithm};
use spinkv::CacheConfig;

const THETA: f64 = 10_000.0;

struct Shape {
    hkv: usize,
    g: usize,
    d: usize,
    cfg: ShadowKvConfig,
}

/// The reference: outlier flags `[Hkv][C]` of a prefill of `prefill` tokens, and the
/// selection (pages ascending, per KV head) of each decode query `qs[i]` `[Hq·D]` at
/// `num_tokens = prefill + 1 + i`.
fn reference(s: &Shape, k_pre: &Tensor, prefill: usize, qs: &[Vec<f64>]) -> (Vec<Vec<bool>>, Vec<Vec<Vec<u32>>>) {
    let (hkv, g, d, p) = (s.hkv, s.g, s.d, s.cfg.chunk_tokens);
    let chunks = prefill / p;
    let l = chunks * p;
    let pos: Vec<f64> = (0..l).map(|t| t as f64).collect();
    let flat = rope_f64(&k_pre.narrow(0, 0, l).unwrap(), &pos, THETA)
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    // kp[t][h]: the post-RoPE key of token t, head h.
    let kp: Vec<Vec<&[f64]>> = (0..l)
        .map(|t| (0..hkv).map(|h| &flat[(t * hkv + h) * d..][..d]).collect())
        .collect();
    let dot = |a: &[f64], b: &[f64]| -> f64 { a.iter().zip(b).map(|(x, y)| x * y).sum() };
    let norm = |a: &[f64]| dot(a, a).sqrt();
    // landmarks[h][c]
    let lm: Vec<Vec<Vec<f64>>> = (0..hkv)
        .map(|h| {
            (0..chunks)
                .map(|c| {
                    (0..d)
                        .map(|x| (0..p).map(|t| kp[c * p + t][h][x]).sum::<f64>() / p as f64)
                        .collect()
                })
                .collect()
        })
        .collect();
    let outlier: Vec<Vec<bool>> = (0..hkv)
        .map(|h| {
            let min_cos: Vec<f64> = (0..chunks)
                .map(|c| {
                    let l = &lm[h][c];
                    (0..p)
                        .map(|t| {
                            let key = kp[c * p + t][h];
                            dot(key, l) / (norm(key) * norm(l))
                        })
                        .fold(f64::INFINITY, f64::min)
                })
                .collect();
            let mut order: Vec<usize> = (0..chunks).collect();
            order.sort_by(|&a, &b| min_cos[a].total_cmp(&min_cos[b]).then(a.cmp(&b)));
            let mut f = vec![false; chunks];
            for &c in order.iter().take(s.cfg.outlier_chunks) {
                f[c] = true;
            }
            f
        })
        .collect();
    let per_head = s.cfg.sparse_budget_tokens / p;
    let scale = 1.0 / (d as f64).sqrt();
    let sels = qs
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let nt = prefill + 1 + i;
            let np = nt.div_ceil(p);
            let exact_from = chunks.min(nt.saturating_sub(s.cfg.window_tokens) / p);
            (0..hkv)
                .map(|h| {
                    // max over the group of each query head's softmax over all chunks.
                    let mut score = vec![f64::NEG_INFINITY; chunks];
                    for j in 0..g {
                        let qh = &q[(h * g + j) * d..][..d];
                        let logits: Vec<f64> = (0..chunks).map(|c| dot(qh, &lm[h][c]) * scale).collect();
                        let m = logits.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                        let z: f64 = logits.iter().map(|x| (x - m).exp()).sum();
                        for c in 0..chunks {
                            score[c] = score[c].max((logits[c] - m).exp() / z);
                        }
                    }
                    let mut pages: Vec<u32> = (0..exact_from).filter(|&c| outlier[h][c]).map(|c| c as u32).collect();
                    let mut eligible: Vec<usize> = (0..exact_from).filter(|&c| !outlier[h][c]).collect();
                    eligible.sort_by(|&x, &y| score[y].total_cmp(&score[x]).then(x.cmp(&y)));
                    pages.extend(eligible.iter().take(per_head).map(|&c| c as u32));
                    pages.extend(exact_from as u32..np as u32);
                    pages.sort_unstable();
                    pages
                })
                .collect()
        })
        .collect();
    (outlier, sels)
}

/// Runs ShadowKV over the prompt in `chunks`, then `decodes` decode steps; returns its
/// outlier flags and each decode step's selection (per KV head). `device`: configured
/// for a fast tier that holds every page (device mode), else for one that holds half.
fn selected(
    s: &Shape,
    q: &Tensor,
    k: &Tensor,
    chunks: &[usize],
    decodes: usize,
    device: bool,
) -> (Vec<Vec<bool>>, Vec<Vec<Vec<u32>>>) {
    let (hkv, g, d, p) = (s.hkv, s.g, s.d, s.cfg.chunk_tokens);
    let mut cc = CacheConfig::new(1, hkv * g, hkv, d);
    cc.page_size = p;
    cc.rope_theta = THETA;
    cc.dtype = DType::F32;
    // Room for the slot layout of `common::algo` (16 owners).
    cc.host_pages = 16 * hkv * common::algo::PAGES_PER_ROW;
    cc.fast_pages = if device { cc.host_pages } else { cc.host_pages / 2 };
    cc.max_seq_len = 4096;
    let mut sk = ShadowKv::new(s.cfg.clone()).unwrap();
    sk.init(&cc).unwrap();
    let prefill: usize = chunks.iter().sum();
    let mut start = 0;
    let mut sels = Vec::new();
    let steps = chunks.iter().copied().chain(std::iter::repeat_n(1, decodes));
    for (i, n) in steps.enumerate() {
        let rows = |x: &Tensor| x.narrow(0, start, n).unwrap().contiguous().unwrap();
        let run = run(3, start, n, 0);
        // The keys are given as pre-RoPE keys; ShadowKV reads only those.
        let (qc, kc) = (rows(q), rows(k));
        index_runs(&mut sk, &[run], &qc, &kc, p);
        start += n;
        if i >= chunks.len() {
            sels.push(select_pages(&mut sk, &[3], &qc, &[start], p, hkv).remove(0));
        }
    }
    assert_eq!(sk.compressed_chunks(0, 3), Some(prefill / p));
    (sk.outliers(0, 3).unwrap().to_vec(), sels)
}

#[test]
fn shadowkv_matches_the_paper_criterion_in_f64() {
    let shapes = [
        Shape {
            hkv: 2,
            g: 2,
            d: 16,
            cfg: ShadowKvConfig {
                chunk_tokens: 8,
                rank: 32,
                sparse_budget_tokens: 40,
                outlier_chunks: 3,
                window_tokens: 24,
            },
        },
        Shape {
            hkv: 3,
            g: 3,
            d: 8,
            cfg: ShadowKvConfig {
                chunk_tokens: 4,
                rank: 24,
                sparse_budget_tokens: 28,
                outlier_chunks: 5,
                window_tokens: 13,
            },
        },
    ];
    // Prefills of odd lengths (a partial last chunk stays exact), in one or more runs.
    let chunkings: [&[usize]; 3] = [&[301], &[64, 100, 133], &[37, 37, 190]];
    for (si, s) in shapes.iter().enumerate() {
        for (ci, chunks) in chunkings.iter().enumerate() {
            let prefill: usize = chunks.iter().sum();
            let decodes = 4;
            let mut r = rng(70 + (si * 10 + ci) as u64);
            let q = randn(&mut r, &[prefill + decodes, s.hkv * s.g, s.d], 1.0);
            let k = randn(&mut r, &[prefill + decodes, s.hkv, s.d], 1.0);
            let q64: Vec<f64> = f32s(&q).iter().map(|&x| x as f64).collect();
            let hqd = s.hkv * s.g * s.d;
            let qs: Vec<Vec<f64>> = (0..decodes)
                .map(|i| q64[(prefill + i) * hqd..][..hqd].to_vec())
                .collect();
            let (want_out, want) = reference(s, &k, prefill, &qs);
            for device in [true, false] {
                let (got_out, got) = selected(s, &q, &k, chunks, decodes, device);
                assert_eq!(
                    got_out, want_out,
                    "shape {si}, chunks {chunks:?}, device {device}: outliers"
                );
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g, w, "shape {si}, chunks {chunks:?}, device {device}, decode step {i}");
                }
            }
            // The budget is spent: every head has its rebuilt chunks beside the exact ones.
            let per_head = s.cfg.sparse_budget_tokens / s.cfg.chunk_tokens;
            assert!(want[0].iter().all(|pages| pages.len() > per_head), "shape {si}");
        }
    }
}
