//! The shared cache harness: run steps with random q/k/v through a [`SparseKvCache`], and
//! an independent f64 reference that keeps every sequence's rotated keys and values per
//! layer and answers what plain causal attention over them gives.
#![allow(dead_code)]

use super::{randn, rope_f64};
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use spinkv::ops::reference_attention;
use spinkv::{PaddedShape, SeqId, SparseKvCache, StepInput};
use std::collections::HashMap;

/// The q/k/v fed to one layer of a step and what the cache returned.
pub struct LayerIo {
    /// `[T, Hq, D]` f32 pre-RoPE queries.
    pub q: Tensor,
    /// `[T, Hkv, D]` f32 pre-RoPE keys.
    pub k: Tensor,
    /// `[T, Hkv, D]` f32 values.
    pub v: Tensor,
    /// `[T, Hq, D]` the cache's output.
    pub out: Tensor,
}

/// One step of `inputs` through every layer with fresh random q/k/v (f32, cast to the
/// cache's dtype), then `end_step`. Returns each layer's inputs and output.
pub fn random_step(cache: &mut dyn SparseKvCache, inputs: &[StepInput], r: &mut StdRng) -> Vec<LayerIo> {
    let c = cache.config().clone();
    let t: usize = inputs.iter().map(|i| i.new_tokens).sum();
    cache.begin_step(inputs).unwrap();
    let mut layers = Vec::with_capacity(c.num_layers);
    for layer in 0..c.num_layers {
        let q = randn(r, &[t, c.num_q_heads, c.head_dim], 1.0);
        let k = randn(r, &[t, c.num_kv_heads, c.head_dim], 1.0);
        let v = randn(r, &[t, c.num_kv_heads, c.head_dim], 1.0);
        let cast = |x: &Tensor| x.to_dtype(c.dtype).unwrap().to_device(&c.device).unwrap();
        let out = cache.attend(layer, &cast(&q), &cast(&k), &cast(&v)).unwrap();
        layers.push(LayerIo { q, k, v, out });
    }
    cache.end_step().unwrap();
    layers
}

/// A new sequence with a prompt of `len` tokens in each of `caches` (equal random inputs,
/// drawn from seed `len`), its handle in each pushed onto the matching `seqs`.
pub fn add_to_each<C: SparseKvCache>(caches: &mut [C], seqs: &mut [Vec<SeqId>], len: usize) {
    for (c, s) in caches.iter_mut().zip(seqs.iter_mut()) {
        let seq = c.add_sequence().unwrap();
        random_step(c, &[StepInput { seq, new_tokens: len }], &mut super::rng(len as u64));
        s.push(seq);
    }
}

/// [`random_step`] as a padded decode step of `shape`: the real rows get exactly the
/// q/k/v `random_step` would draw from `r` (so two caches fed from equal seeds see equal
/// inputs), the padding rows garbage from `pad` at scale 1000. Returns each layer's
/// real-row inputs and the whole `[shape.batch, Hq, D]` output.
pub fn padded_step(
    cache: &mut dyn SparseKvCache,
    inputs: &[StepInput],
    shape: PaddedShape,
    r: &mut StdRng,
    pad: &mut StdRng,
) -> Vec<LayerIo> {
    try_padded_step(cache, inputs, shape, r, pad).unwrap()
}

/// [`padded_step`] that returns the first error of `begin_padded_decode` (no step is
/// then open), `attend` or `end_step` (the step is then still open) instead of panicking.
pub fn try_padded_step(
    cache: &mut dyn SparseKvCache,
    inputs: &[StepInput],
    shape: PaddedShape,
    r: &mut StdRng,
    pad: &mut StdRng,
) -> spinkv::Result<Vec<LayerIo>> {
    try_padded_step_with(cache, inputs, shape, r, pad, |_| Ok(()))
}

/// [`try_padded_step`] with `between` called once the step has begun, before its first
/// layer (e.g. to try invalid input first, or to prepare the step); its error is
/// returned (the step is then still open).
pub fn try_padded_step_with(
    cache: &mut dyn SparseKvCache,
    inputs: &[StepInput],
    shape: PaddedShape,
    r: &mut StdRng,
    pad: &mut StdRng,
    between: impl FnOnce(&mut dyn SparseKvCache) -> spinkv::Result<()>,
) -> spinkv::Result<Vec<LayerIo>> {
    let c = cache.config().clone();
    let (t, extra) = (inputs.len(), shape.batch - inputs.len());
    cache.begin_padded_decode(inputs, shape)?;
    between(&mut *cache)?;
    let mut layers = Vec::with_capacity(c.num_layers);
    for layer in 0..c.num_layers {
        let q = randn(r, &[t, c.num_q_heads, c.head_dim], 1.0);
        let k = randn(r, &[t, c.num_kv_heads, c.head_dim], 1.0);
        let v = randn(r, &[t, c.num_kv_heads, c.head_dim], 1.0);
        let full = |x: &Tensor, h: usize, r: &mut StdRng| {
            let x = if extra == 0 {
                x.clone()
            } else {
                Tensor::cat(&[x, &randn(r, &[extra, h, c.head_dim], 1000.0)], 0).unwrap()
            };
            x.to_dtype(c.dtype).unwrap().to_device(&c.device).unwrap()
        };
        let (qp, kp, vp) = (
            full(&q, c.num_q_heads, pad),
            full(&k, c.num_kv_heads, pad),
            full(&v, c.num_kv_heads, pad),
        );
        let out = cache.attend(layer, &qp, &kp, &vp)?;
        layers.push(LayerIo { q, k, v, out });
    }
    cache.end_step()?;
    Ok(layers)
}

/// Plain causal attention over everything a sequence has seen, per layer, in f64.
pub struct Reference {
    theta: f64,
    scale: f64,
    /// (sequence, layer) → (rotated keys, values) chunks, in order.
    kv: HashMap<(SeqId, usize), (Vec<Tensor>, Vec<Tensor>)>,
    lens: HashMap<SeqId, usize>,
}

impl Reference {
    /// A reference for rotary base `theta` and head dim `head_dim`.
    pub fn new(theta: f64, head_dim: usize) -> Self {
        Self {
            theta,
            scale: 1.0 / (head_dim as f64).sqrt(),
            kv: HashMap::new(),
            lens: HashMap::new(),
        }
    }

    /// Records one step (the inputs given to [`random_step`] and what it returned) and
    /// returns, per layer, the max abs difference between the cache's output and the
    /// reference's over every token of the step.
    pub fn check_step(&mut self, inputs: &[StepInput], layers: &[LayerIo]) -> Vec<f64> {
        let mut worst = vec![0f64; layers.len()];
        let mut row = 0;
        for inp in inputs {
            let n = inp.new_tokens;
            let start = self.lens.get(&inp.seq).copied().unwrap_or(0);
            let pos: Vec<f64> = (start..start + n).map(|p| p as f64).collect();
            let qp: Vec<usize> = (start..start + n).collect();
            for (layer, io) in layers.iter().enumerate() {
                let rows = |x: &Tensor| x.narrow(0, row, n).unwrap();
                let (ks, vs) = self.kv.entry((inp.seq, layer)).or_default();
                ks.push(rope_f64(&rows(&io.k), &pos, self.theta));
                vs.push(rows(&io.v).to_dtype(DType::F64).unwrap());
                let q = rope_f64(&rows(&io.q), &pos, self.theta);
                let want = reference_attention(
                    &q,
                    &Tensor::cat(ks, 0).unwrap(),
                    &Tensor::cat(vs, 0).unwrap(),
                    &qp,
                    self.scale,
                )
                .unwrap();
                let got = rows(&io.out).to_device(&candle_core::Device::Cpu).unwrap();
                worst[layer] = worst[layer].max(super::max_abs_diff(&got, &want));
            }
            self.lens.insert(inp.seq, start + n);
            row += n;
        }
        worst
    }
}

/// One decode step (a token per sequence) of each cache over its own `seqs[i]`, all fed
/// the same random q/k/v from `seed`; every layer's output must equal the first cache's
/// within `tol` (`what` names the comparison in a failure).
pub fn decode_each_and_compare<C: SparseKvCache>(
    caches: &mut [C],
    seqs: &[Vec<SeqId>],
    seed: u64,
    tol: f64,
    what: &str,
) {
    let outs: Vec<_> = caches
        .iter_mut()
        .zip(seqs)
        .map(|(c, s)| {
            let inputs: Vec<StepInput> = s.iter().map(|&seq| StepInput { seq, new_tokens: 1 }).collect();
            random_step(c, &inputs, &mut super::rng(seed))
        })
        .collect();
    for (i, other) in outs.iter().enumerate().skip(1) {
        for (layer, (a, b)) in outs[0].iter().zip(other).enumerate() {
            let e = super::max_abs_diff(&a.out, &b.out);
            assert!(e <= tol, "{what}, layer {layer}: cache 0 and cache {i} differ by {e}");
        }
    }
}

/// Removes every sequence of each cache, then checks its accounting and that it holds no
/// host page any more.
pub fn remove_all_and_check(caches: &mut [spinkv::SpinCache], seqs: Vec<Vec<SeqId>>) {
    for (c, s) in caches.iter_mut().zip(seqs) {
        for id in s {
            c.remove_sequence(id).unwrap();
        }
        c.verify_accounting().unwrap();
        assert_eq!(c.pool_usage().host_used, 0);
    }
}
