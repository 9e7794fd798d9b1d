//! InfLLM against its paper's criterion, written from scratch here in f64 (issue 17,
//! item 2): a key's attention mass is the softmax weight it gets from every query whose
//! local window (`window_tokens` keys ending at the query) holds it, summed over the query
//! heads of its KV head; a block's representative keys are its `repr_topk` keys of most
//! mass per KV head; a block's score is the mean over its representatives of the decode
//! query's dot product with them, summed over all heads; the top `topk_blocks` blocks
//! outside the sink and the window are attended, with the sink and the window.
//!
//! The algorithm is driven directly (post-RoPE inputs), with the prompt indexed in chunks
//! of several sizes, on random inputs: the selected pages must equal the reference's.

mod common;

use candle_core::Tensor;
use common::algo::{index_runs, run, select_pages};
use common::*;
use spinkv::partition::{InfLlm, InfLlmConfig, SparseAlgorithm, TokenRun};
use spinkv::CacheConfig;

struct Shape {
    hkv: usize,
    g: usize,
    d: usize,
    page: usize,
    cfg: InfLlmConfig,
}

/// The reference selection (pages, ascending) of the decode token at position `len`.
fn reference(s: &Shape, q: &[f64], k: &[f64], len: usize) -> Vec<u32> {
    let (hkv, g, d, p) = (s.hkv, s.g, s.d, s.page);
    let hq = hkv * g;
    let c = &s.cfg;
    let (bt, w, r) = (c.block_tokens, c.window_tokens, c.repr_topk);
    let scale = 1.0 / (d as f64).sqrt();
    let dot = |qi: usize, qh: usize, ki: usize, kh: usize| -> f64 {
        (0..d)
            .map(|x| q[(qi * hq + qh) * d + x] * k[(ki * hkv + kh) * d + x])
            .sum()
    };
    // Blocks finalized when the decode token is indexed: their last token left every
    // later window, (b + 1)·bt + w <= len + 1.
    let blocks = (len + 1).saturating_sub(w) / bt;
    // Mass of every key of those blocks, from the prompt's queries.
    let mut mass = vec![0f64; blocks * bt * hkv];
    for qi in 0..len {
        let lo = (qi + 1).saturating_sub(w);
        for h in 0..hkv {
            for j in 0..g {
                let sc: Vec<f64> = (lo..=qi).map(|t| dot(qi, h * g + j, t, h) * scale).collect();
                let m = sc.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                for (t, x) in (lo..=qi).zip(&sc) {
                    if t < blocks * bt {
                        mass[t * hkv + h] += (x - m).exp() / z;
                    }
                }
            }
        }
    }
    // Block scores: the decode query (position len) against each block's representatives.
    let mut scores = Vec::with_capacity(blocks);
    for b in 0..blocks {
        let mut total = 0.0;
        for h in 0..hkv {
            let mut order: Vec<usize> = (b * bt..(b + 1) * bt).collect();
            order.sort_by(|&x, &y| mass[y * hkv + h].total_cmp(&mass[x * hkv + h]).then(x.cmp(&y)));
            for &t in &order[..r] {
                total += (0..g).map(|j| dot(len, h * g + j, t, h)).sum::<f64>();
            }
        }
        scores.push(total / r as f64);
    }
    let (nt, np) = (len + 1, (len + 1).div_ceil(p));
    let sink_pages = c.sink_tokens.div_ceil(p);
    let forced_from = (blocks * bt).min(nt.saturating_sub(w)) / p;
    let bp = bt / p;
    let mut pages: Vec<u32> = (0..np as u32)
        .filter(|&j| (j as usize) < sink_pages || j as usize >= forced_from)
        .collect();
    let mut eligible: Vec<usize> = (0..blocks)
        .filter(|&j| (j + 1) * bp > sink_pages && j * bp < forced_from)
        .collect();
    eligible.sort_by(|&x, &y| scores[y].total_cmp(&scores[x]).then(x.cmp(&y)));
    for &j in eligible.iter().take(c.topk_blocks) {
        pages.extend((j * bp..((j + 1) * bp).min(np)).map(|x| x as u32));
    }
    pages.sort_unstable();
    pages.dedup();
    pages
}

/// Runs InfLLM over the prompt in `chunks`, then indexes and selects for the decode token.
fn selected(s: &Shape, q: &Tensor, k: &Tensor, chunks: &[usize]) -> Vec<Vec<u32>> {
    let (hkv, g, d) = (s.hkv, s.g, s.d);
    let mut cc = CacheConfig::new(1, hkv * g, hkv, d);
    cc.page_size = s.page;
    cc.host_pages = 16 * hkv * common::algo::PAGES_PER_ROW;
    let mut inf = InfLlm::new(s.cfg.clone()).unwrap();
    inf.init(&cc).unwrap();
    let len: usize = chunks.iter().sum();
    let mut start = 0;
    for &n in chunks.iter().chain(std::iter::once(&1)) {
        let rows = |x: &Tensor| x.narrow(0, start, n).unwrap().contiguous().unwrap();
        index_runs(&mut inf, &[run(7, start, n, 0)], &rows(q), &rows(k), s.page);
        start += n;
    }
    let qd = q.narrow(0, len, 1).unwrap().contiguous().unwrap();
    select_pages(&mut inf, &[7], &qd, &[len + 1], s.page, hkv).remove(0)
}

/// The first test shape (also the batched test's).
fn small() -> Shape {
    Shape {
        hkv: 2,
        g: 2,
        d: 16,
        page: 8,
        cfg: InfLlmConfig {
            block_tokens: 16,
            sink_tokens: 16,
            window_tokens: 40,
            topk_blocks: 3,
            repr_topk: 2,
        },
    }
}

#[test]
fn infllm_matches_the_paper_criterion_in_f64() {
    let shapes = [
        small(),
        Shape {
            hkv: 3,
            g: 3,
            d: 8,
            page: 4,
            cfg: InfLlmConfig {
                block_tokens: 8,
                sink_tokens: 5,
                window_tokens: 21,
                topk_blocks: 4,
                repr_topk: 3,
            },
        },
    ];
    let chunkings: [&[usize]; 4] = [&[301], &[64, 1, 100, 136], &[37, 37, 37, 190], &[200, 1, 1, 1, 98]];
    for (si, s) in shapes.iter().enumerate() {
        for (ci, chunks) in chunkings.iter().enumerate() {
            let len: usize = chunks.iter().sum();
            let mut r = rng(40 + (si * 10 + ci) as u64);
            let q = randn(&mut r, &[len + 1, s.hkv * s.g, s.d], 1.0);
            let k = randn(&mut r, &[len + 1, s.hkv, s.d], 1.0);
            let want = reference(
                s,
                &f32s(&q).iter().map(|&x| x as f64).collect::<Vec<_>>(),
                &f32s(&k).iter().map(|&x| x as f64).collect::<Vec<_>>(),
                len,
            );
            let got = selected(s, &q, &k, chunks);
            assert_eq!(got.len(), s.hkv);
            for (h, pages) in got.iter().enumerate() {
                assert_eq!(pages, &want, "shape {si}, chunks {chunks:?}, head {h}");
            }
        }
    }
}

/// `for_budget_with_block` (the `infllm-b16` variant) keeps `for_budget`'s sink and
/// window and spends the rest of the budget on blocks of the asked size.
#[test]
fn for_budget_with_block_spends_the_same_budget() {
    for budget in [64usize, 300, 1024, 4096, 20_000] {
        let base = InfLlmConfig::for_budget(budget);
        let b16 = InfLlmConfig::for_budget_with_block(budget, 16);
        assert_eq!(b16.block_tokens, 16);
        assert_eq!(
            (b16.sink_tokens, b16.window_tokens),
            (base.sink_tokens, base.window_tokens)
        );
        let rest = budget.saturating_sub(base.sink_tokens + base.window_tokens);
        assert_eq!(b16.topk_blocks, rest / 16, "budget {budget}");
        assert!(b16.budget_tokens() <= budget.max(base.sink_tokens + base.window_tokens));
        assert!(InfLlm::new(b16).is_ok(), "budget {budget}");
    }
    assert_eq!(InfLlmConfig::for_budget_with_block(1024, 16).topk_blocks, 44);
}

/// Several sequences indexed and selected together (one `index` call with a run per
/// sequence, then one decode token each, then one `select` for all): each sequence's
/// pages equal its reference, whatever the others hold (here one has no finalized block).
#[test]
fn batched_sequences_match_the_reference_each() {
    let s = small();
    let (hkv, g, d) = (s.hkv, s.g, s.d);
    let lens = [301usize, 20, 150];
    let mut r = rng(91);
    let qs: Vec<Tensor> = lens.iter().map(|&l| randn(&mut r, &[l + 1, hkv * g, d], 1.0)).collect();
    let ks: Vec<Tensor> = lens.iter().map(|&l| randn(&mut r, &[l + 1, hkv, d], 1.0)).collect();
    let mut cc = CacheConfig::new(1, hkv * g, hkv, d);
    cc.page_size = s.page;
    cc.host_pages = 16 * hkv * common::algo::PAGES_PER_ROW;
    let mut inf = InfLlm::new(s.cfg.clone()).unwrap();
    inf.init(&cc).unwrap();
    let seqs: Vec<u64> = vec![4, 9, 2];
    // The prompts, then the decode tokens: each call carries every sequence.
    for decode in [false, true] {
        let span = |l: usize| if decode { (l, 1) } else { (0, l) };
        let cat = |xs: &[Tensor]| {
            let parts: Vec<Tensor> = xs
                .iter()
                .zip(&lens)
                .map(|(x, &l)| x.narrow(0, span(l).0, span(l).1).unwrap())
                .collect();
            Tensor::cat(&parts, 0).unwrap()
        };
        let mut row = 0;
        let runs: Vec<TokenRun> = seqs
            .iter()
            .zip(&lens)
            .map(|(&seq, &l)| {
                let (start, n) = span(l);
                let r = run(seq, start, n, row);
                row += n;
                r
            })
            .collect();
        index_runs(&mut inf, &runs, &cat(&qs), &cat(&ks), s.page);
    }
    let nt: Vec<usize> = lens.iter().map(|&l| l + 1).collect();
    let qd: Vec<Tensor> = qs.iter().zip(&lens).map(|(x, &l)| x.narrow(0, l, 1).unwrap()).collect();
    let got = select_pages(&mut inf, &seqs, &Tensor::cat(&qd, 0).unwrap(), &nt, s.page, hkv);
    assert_eq!(inf.finalized_blocks(0, 9), 0, "the short sequence has no block");
    for (i, &l) in lens.iter().enumerate() {
        let f64s = |x: &Tensor| f32s(x).iter().map(|&y| y as f64).collect::<Vec<_>>();
        let want = reference(&s, &f64s(&qs[i]), &f64s(&ks[i]), l);
        for (hi, pages) in got[i].iter().enumerate() {
            assert_eq!(pages, &want, "sequence {i} (length {l}), head {hi}");
        }
    }
}
