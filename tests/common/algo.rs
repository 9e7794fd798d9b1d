//! Driving a [`SparseAlgorithm`] directly, without a cache (the selection tests against
//! f64 references of the papers' criteria): index runs of tokens into layer 0, then
//! select for decoding sequences and read the pages back.
#![allow(dead_code)]

use super::u32s;
use candle_core::{DType, Device, Tensor};
use spinkv::ops::NONE;
use spinkv::partition::{IndexInput, SelectInput, Selection, SparseAlgorithm, TokenRun};

/// Indexes `runs` into layer 0: rows of `q` `[T, Hq, D]` and `k` `[T, Hkv, D]` (`k` is
/// given as the post-RoPE keys, the pre-RoPE keys and the values alike).
pub fn index_runs(algo: &mut dyn SparseAlgorithm, runs: &[TokenRun], q: &Tensor, k: &Tensor) {
    let (t, hkv, _) = k.dims3().unwrap();
    let dst = Tensor::zeros((t, hkv), DType::U32, &Device::Cpu).unwrap();
    algo.index(&IndexInput {
        layer: 0,
        runs,
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
/// each (sequence, KV head), without padding.
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
    // Each row's host slots (here its logical ids), NONE past its pages, as the cache
    // hands them over.
    let slots: Vec<u32> = np
        .iter()
        .flat_map(|&n| (0..hkv).flat_map(move |_| (0..nmax).map(move |j| if j < n { j as u32 } else { NONE })))
        .collect();
    let candidates = Tensor::from_vec(slots, (seqs.len(), hkv, nmax), &Device::Cpu).unwrap();
    let sel = algo
        .select(&SelectInput {
            layer: 0,
            seqs,
            q,
            candidates: &candidates,
            num_pages: &np,
            num_tokens,
            page_size: page,
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
                    v[(bi * h + hi) * k..][..k]
                        .iter()
                        .copied()
                        .filter(|&x| x != NONE)
                        .collect()
                })
                .collect()
        })
        .collect()
}
