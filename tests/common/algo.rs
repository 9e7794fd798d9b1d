//! Driving a [`SparseAlgorithm`] directly, without a cache (the selection tests against
//! f64 references of the papers' criteria): index runs of tokens into layer 0, then
//! select for decoding sequences and read the pages back.
#![allow(dead_code)]

use super::u32s;
use candle_core::{Device, Tensor};
use spinkv::ops::NONE;
use spinkv::partition::{IndexInput, SelectInput, Selection, SparseAlgorithm, TokenRun};

/// Logical pages one (sequence, KV head) may hold in these tests' slot layout.
pub const PAGES_PER_ROW: usize = 4096;

/// The owner index these tests give sequence `seq` (distinct for ids below 16).
pub fn owner_of(seq: u64) -> u32 {
    (seq % 16) as u32
}

/// The host slot of logical page `page` of (owner, KV head `h`): each (owner, head) owns
/// [`PAGES_PER_ROW`] consecutive slots (a cache with 16 · Hkv · 4096 page slots holds them).
pub fn slot_of(owner: u32, h: usize, hkv: usize, page: usize) -> u32 {
    assert!(
        page < PAGES_PER_ROW,
        "page {page} past the test layout's {PAGES_PER_ROW}"
    );
    ((owner as usize * hkv + h) * PAGES_PER_ROW + page) as u32
}

/// A `TokenRun` of `seq` with the owner [`owner_of`] gives it.
pub fn run(seq: u64, start: usize, n: usize, row: usize) -> TokenRun {
    TokenRun {
        seq,
        start,
        n,
        row,
        owner: owner_of(seq),
    }
}

/// Indexes `runs` into layer 0: rows of `q` `[T, Hq, D]` and `k` `[T, Hkv, D]` (`k` is
/// given as the post-RoPE keys, the pre-RoPE keys and the values alike), with pages of
/// `page` tokens at the slots [`slot_of`] gives.
pub fn index_runs(algo: &mut dyn SparseAlgorithm, runs: &[TokenRun], q: &Tensor, k: &Tensor, page: usize) {
    let (t, hkv, _) = k.dims3().unwrap();
    let mut codes = vec![NONE; t * hkv];
    for r in runs {
        for i in 0..r.n {
            let pos = r.start + i;
            for h in 0..hkv {
                codes[(r.row + i) * hkv + h] = slot_of(r.owner, h, hkv, pos / page) * page as u32 + (pos % page) as u32;
            }
        }
    }
    let dst = Tensor::from_vec(codes, (t, hkv), &Device::Cpu).unwrap();
    let table = TokenRun::table(runs, &Device::Cpu).unwrap();
    algo.index(&IndexInput {
        layer: 0,
        runs,
        runs_table: &table,
        q,
        k,
        k_pre_rope: k,
        v: k,
        dst: &dst,
        minmax_updated: false,
    })
    .unwrap();
}

/// Selects at layer 0 for the decoding `seqs` (queries `q` `[B, Hq, D]`, `num_tokens`
/// each, the new one included; pages of `page` tokens). Returns the logical pages of
/// each (sequence, KV head), ascending, without padding.
pub fn select_pages(
    algo: &mut dyn SparseAlgorithm,
    seqs: &[u64],
    q: &Tensor,
    num_tokens: &[usize],
    page: usize,
    hkv: usize,
) -> Vec<Vec<Vec<u32>>> {
    let np: Vec<usize> = num_tokens.iter().map(|t| t.div_ceil(page)).collect();
    let nmax = np.iter().copied().max().unwrap_or(1);
    // Each row's host slots ([`slot_of`]), NONE past its pages, as the cache hands them
    // over.
    let mut slots = vec![NONE; seqs.len() * hkv * nmax];
    for (b, (&seq, &n)) in seqs.iter().zip(&np).enumerate() {
        for h in 0..hkv {
            for j in 0..n {
                slots[(b * hkv + h) * nmax + j] = slot_of(owner_of(seq), h, hkv, j);
            }
        }
    }
    let candidates = Tensor::from_vec(slots, (seqs.len(), hkv, nmax), &Device::Cpu).unwrap();
    let rows: Vec<TokenRun> = seqs
        .iter()
        .zip(num_tokens)
        .enumerate()
        .map(|(b, (&seq, &t))| run(seq, t - 1, 1, b))
        .collect();
    let rows = TokenRun::table(&rows, &Device::Cpu).unwrap();
    let sel = algo
        .select(&SelectInput {
            layer: 0,
            seqs,
            q,
            rows: &rows,
            candidates: &candidates,
            num_pages: &np,
            num_tokens,
            page_size: page,
            to_host: true,
        })
        .unwrap();
    let Selection::Pages(t) = sel else {
        panic!("{} must select pages", algo.name())
    };
    let (b, h, k) = t.dims3().unwrap();
    assert_eq!((b, h), (seqs.len(), hkv), "selection shape");
    let v = u32s(&t);
    (0..b)
        .map(|bi| {
            (0..h)
                .map(|hi| {
                    let mut pages: Vec<u32> = v[(bi * h + hi) * k..][..k]
                        .iter()
                        .copied()
                        .filter(|&x| x != NONE)
                        .collect();
                    // A selection's order is free (the cache sorts host lists).
                    pages.sort_unstable();
                    pages
                })
                .collect()
        })
        .collect()
}

/// ShadowKV as the small cache shapes of the tests can hold it (their Hkv·D is 32, below
/// the default rank): rank 16, a 32-token sparse budget, two outlier chunks, a 16-token
/// window.
pub fn small_shadowkv() -> spinkv::partition::ShadowKv {
    spinkv::partition::ShadowKv::new(spinkv::partition::ShadowKvConfig {
        rank: 16,
        sparse_budget_tokens: 32,
        outlier_chunks: 2,
        window_tokens: 16,
        ..Default::default()
    })
    .unwrap()
}

/// Algorithm `name` (`partition::ALGORITHMS`) with a token budget of `budget`, ShadowKV
/// as [`small_shadowkv`].
pub fn small_algo(name: &str, budget: usize) -> Box<dyn SparseAlgorithm> {
    if name == "shadowkv" {
        return Box::new(small_shadowkv());
    }
    spinkv::partition::by_name(name, budget).unwrap()
}
