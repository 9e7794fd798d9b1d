//! ShadowKV's compression of a prefill: the batched low-rank factorization of the
//! pre-RoPE keys, the landmarks (mean post-RoPE key per chunk) and the outlier chunks
//! (lowest minimum cosine similarity of a key to its landmark), and the RoPE tables both
//! use.

use super::{Compressed, ShadowKv};
use crate::linalg::{randomized_low_rank_stacked, LowRank, LowRankOptions};
use crate::partition::SelectInput;
use crate::rope::rope_tables;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// When [`ShadowKv::compress_ahead`] adds later layers to a layer's compression: while
/// that layer compresses fewer sequences than the host has threads (its small Cholesky and
/// eigen problems, one per matrix, then leave threads idle), and only as long as the batch
/// stays within `AHEAD_MATRICES` matrices and [`STACK_ELEMENTS`] key elements (so that
/// its same-length matrices make one stack). On the H200 (16 host threads, SmolLM2 at
/// 8K), 4 sequences a step compressed with their 30 layers together took the last such
/// step from 961 to 628 ms; 16 a step with 10 layers together went from 1,802 to
/// 2,674 ms (`docs/BENCHMARKS.md`).
const AHEAD_MATRICES: usize = 128;

/// The most key elements (`L · Hkv · D` summed over the items) compressed as one stack:
/// 2^28, 1 GiB of f32 per temporary (64 SmolLM2 prefills of 8K take 2^26.6; one
/// Llama-3.1-8B prefill of 128K 2^27).
const STACK_ELEMENTS: usize = 1 << 28;

impl ShadowKv {
    /// The compressed states `(seq, state)` for `input`'s layer of every sequence at its
    /// first decode step there: taken from `ahead` where an earlier layer compressed it
    /// (and the chunk count still matches), else compressed now, in one batch with RoPE
    /// tables covering the longest prefill. With [`compress_ahead`](ShadowKv::compress_ahead)
    /// in effect, the batch also compresses those sequences' later layers (see
    /// [`AHEAD_MATRICES`]) and parks each result in that layer's `ahead`.
    pub(super) fn compress_for_select(&mut self, input: &SelectInput<'_>) -> Result<Vec<(u64, Compressed)>> {
        let (p, hkv, layer) = (self.page_size, self.kv_heads, input.layer);
        let mut todo: Vec<(u64, usize)> = Vec::new();
        let mut done: Vec<(u64, Compressed)> = Vec::new();
        // (A padded step's padding rows have no sequence: u64::MAX.)
        for (b, &seq) in input.seqs.iter().enumerate().filter(|(_, &s)| s != u64::MAX) {
            let st = self.seqs.get_mut(&(layer, seq)).ok_or(Error::UnknownSequence(seq))?;
            if st.comp.is_none() {
                let chunks = input.num_tokens[b].saturating_sub(1) / p;
                match st.ahead.take() {
                    Some(a) if a.chunks == chunks => done.push((seq, a)),
                    _ => todo.push((seq, chunks)),
                }
            }
        }
        // (layer, seq, keys, chunks) of each matrix to factorize: this layer's first.
        let mut work: Vec<(usize, u64, Option<&Tensor>, usize)> = todo
            .iter()
            .map(|&(seq, c)| {
                (
                    layer,
                    seq,
                    self.seqs.get(&(layer, seq)).and_then(|st| st.prefill_k.as_ref()),
                    c,
                )
            })
            .collect();
        if self.ahead_on && !todo.is_empty() && todo.len() < rayon::current_num_threads() {
            let elements = |w: &[(usize, u64, Option<&Tensor>, usize)]| {
                w.iter().map(|t| t.3 * p * hkv * self.head_dim).sum::<usize>()
            };
            let mut total = elements(&work);
            for later in layer + 1..self.layers {
                let more: Vec<_> = todo
                    .iter()
                    .filter_map(|&(seq, c)| {
                        let st = self.seqs.get(&(later, seq))?;
                        let k = st.prefill_k.as_ref()?;
                        let ready = st.comp.is_none() && st.ahead.is_none() && c > 0 && k.dim(0).ok()? >= c * p;
                        ready.then_some((later, seq, Some(k), c))
                    })
                    .collect();
                total += elements(&more);
                if more.is_empty() || total > STACK_ELEMENTS || work.len() + more.len() > AHEAD_MATRICES {
                    break;
                }
                work.extend(more);
            }
        }
        let upto = work.iter().filter(|t| t.2.is_some()).map(|t| t.3 * p).max();
        let rope = match (upto, work.iter().find_map(|t| t.2)) {
            (Some(upto), Some(k)) => Some(rope_tables_upto(
                &mut self.rope,
                upto,
                self.head_dim,
                self.rope_theta,
                k.device(),
            )?),
            _ => None,
        };
        let items: Vec<(Option<&Tensor>, usize)> = work.iter().map(|&(_, _, k, c)| (k, c)).collect();
        let compressed = self.compress_batch(&items, rope.as_ref())?;
        let targets: Vec<(usize, u64)> = work.iter().map(|t| (t.0, t.1)).collect();
        for ((l, seq), comp) in targets.into_iter().zip(compressed) {
            match (l == layer, self.seqs.get_mut(&(l, seq))) {
                (true, _) => done.push((seq, comp)),
                (false, Some(st)) => st.ahead = Some(comp),
                (false, None) => {}
            }
        }
        Ok(done)
    }

    /// Compresses, for each `(keys, chunks)`, the first `chunks` chunks of the buffered
    /// pre-RoPE keys `[L, Hkv, D]` (no keys or no chunks: nothing compressed). The
    /// factorizations run as one batch; items of the same length are stacked, so their
    /// landmarks and outlier scores take one set of kernels and one host read.
    pub(super) fn compress_batch(
        &self,
        items: &[(Option<&Tensor>, usize)],
        rope: Option<&(Tensor, Tensor)>,
    ) -> Result<Vec<Compressed>> {
        let _span = (!items.is_empty()).then(|| crate::host_timing::span("shadowkv.compress"));
        let (p, hkv, d) = (self.page_size, self.kv_heads, self.head_dim);
        let stacks = stack_items(
            &items
                .iter()
                .map(|&(k, c)| if k.is_some() { c } else { 0 })
                .collect::<Vec<_>>(),
            p * hkv * d,
            STACK_ELEMENTS,
        );
        // [b, L, Hkv, D] f32 pre-RoPE keys of each stack.
        let mut k_pre = Vec::with_capacity(stacks.len());
        for (chunks, ids) in &stacks {
            let ks = ids
                .iter()
                .map(|&i| match items[i].0 {
                    Some(k) => Ok(k.narrow(0, 0, chunks * p)?),
                    None => Err(Error::Config("shadowkv: a stacked item has no keys".into())),
                })
                .collect::<Result<Vec<_>>>()?;
            k_pre.push(Tensor::stack(&ks, 0)?.to_dtype(DType::F32)?);
        }
        // Each stack factorized as it is: [b, L, Hkv·D].
        let flat = k_pre
            .iter()
            .zip(&stacks)
            .map(|(k, (chunks, ids))| k.reshape((ids.len(), chunks * p, hkv * d)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut factors = randomized_low_rank_stacked(
            &flat.iter().collect::<Vec<_>>(),
            self.cfg.rank,
            LowRankOptions::default(),
        )?
        .into_iter();
        let mut out: Vec<Option<Compressed>> = (0..items.len()).map(|_| None).collect();
        for (k, (chunks, ids)) in k_pre.iter().zip(&stacks) {
            let rope = rope.ok_or_else(|| Error::Config("shadowkv: no RoPE tables to compress with".into()))?;
            let lrs = ids
                .iter()
                .map(|_| {
                    factors
                        .next()
                        .ok_or_else(|| Error::Config("shadowkv: a factor is missing".into()))
                })
                .collect::<Result<Vec<_>>>()?;
            for (&i, comp) in ids.iter().zip(self.compress(k, *chunks, lrs, rope)?) {
                out[i] = Some(comp);
            }
        }
        Ok(out
            .into_iter()
            .map(|c| {
                c.unwrap_or_else(|| Compressed {
                    chunks: 0,
                    left: None,
                    right: None,
                    landmarks: None,
                    outlier: vec![Vec::new(); hkv],
                    outlier_ids: vec![Vec::new(); hkv],
                    outlier_mask: None,
                    left_pages: Vec::new(),
                })
            })
            .collect())
    }

    /// The compressed states of a stack of `b` prefills of `chunks` chunks, pre-RoPE keys
    /// `k_pre` `[b, L, Hkv, D]` f32, with their low-rank factors `lrs` (one per item):
    /// landmarks and outlier flags.
    fn compress(
        &self,
        k_pre: &Tensor,
        chunks: usize,
        lrs: Vec<LowRank>,
        rope: &(Tensor, Tensor),
    ) -> Result<Vec<Compressed>> {
        let (p, hkv, d) = (self.page_size, self.kv_heads, self.head_dim);
        let (b, l) = (lrs.len(), chunks * p);
        let (cos, sin) = (rope.0.narrow(0, 0, l)?, rope.1.narrow(0, 0, l)?);
        let k_post =
            candle_nn::rotary_emb::rope_thd(&k_pre.contiguous()?, &cos, &sin)?.reshape((b, chunks, p, hkv, d))?;
        let landmarks = k_post.mean(2)?; // [b, C, Hkv, D]
        let unit = |x: &Tensor| -> Result<Tensor> {
            let norm = x.sqr()?.sum_keepdim(candle_core::D::Minus1)?.sqrt()?;
            Ok(x.broadcast_div(&(norm + 1e-12)?)?)
        };
        let cos_sim = unit(&k_post)?
            .broadcast_mul(&unit(&landmarks)?.unsqueeze(2)?)?
            .sum(4)? // [b, C, P, Hkv]
            .min(2)? // [b, C, Hkv]
            .to_device(&Device::Cpu)?
            .to_vec3::<f32>()?;
        let landmarks = landmarks.transpose(1, 2)?.contiguous()?; // [b, Hkv, C, D]
        let mut out = Vec::with_capacity(b);
        for ((j, lr), cos_sim) in lrs.into_iter().enumerate().zip(&cos_sim) {
            let outlier: Vec<Vec<bool>> = (0..hkv)
                .map(|h| {
                    let mut order: Vec<usize> = (0..chunks).collect();
                    order.sort_by(|&a, &b| cos_sim[a][h].total_cmp(&cos_sim[b][h]).then(a.cmp(&b)));
                    let mut flags = vec![false; chunks];
                    for &c in order.iter().take(self.cfg.outlier_chunks) {
                        flags[c] = true;
                    }
                    flags
                })
                .collect();
            let outlier_ids = outlier
                .iter()
                .map(|f| (0..chunks as u32).filter(|&c| f[c as usize]).collect())
                .collect();
            let mask: Vec<f32> = outlier
                .iter()
                .flat_map(|f| f.iter().map(|&o| if o { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            out.push(Compressed {
                chunks,
                left: Some(lr.left),
                right: Some(lr.right),
                // Its own rows only (`Tensor::copy` would clone the whole stack's storage).
                landmarks: Some(landmarks.get(j)?.force_contiguous()?),
                outlier,
                outlier_ids,
                outlier_mask: Some(Tensor::from_vec(mask, (hkv, chunks), k_pre.device())?),
                left_pages: Vec::new(),
            });
        }
        Ok(out)
    }
}

/// Stacks of the items with `chunks[i] > 0`, by chunk count, in order of first
/// appearance, each holding at most `cap` elements (`chunk_elements` per chunk) or one
/// item: `(chunks, item indices)`.
fn stack_items(chunks: &[usize], chunk_elements: usize, cap: usize) -> Vec<(usize, Vec<usize>)> {
    let mut stacks: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, &c) in chunks.iter().enumerate().filter(|(_, &c)| c > 0) {
        let room = |ids: &Vec<usize>| (ids.len() + 1) * c * chunk_elements <= cap;
        match stacks.iter_mut().find(|(sc, ids)| *sc == c && room(ids)) {
            Some((_, ids)) => ids.push(i),
            None => stacks.push((c, vec![i])),
        }
    }
    stacks
}

/// The RoPE tables `cos`, `sin` `[n, D/2]` f32 on `device` for positions `0..n`,
/// `n >= upto`, kept in `tables` (built once per device, grown by doubling).
pub(super) fn rope_tables_upto(
    tables: &mut Option<(Tensor, Tensor)>,
    upto: usize,
    head_dim: usize,
    theta: f64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let usable = |c: &Tensor| c.device().same_device(device);
    let have = match tables.as_ref() {
        Some((c, _)) if usable(c) => c.dim(0)?,
        _ => 0,
    };
    if let (Some(t), true) = (tables.as_ref(), have > 0 && have >= upto) {
        return Ok(t.clone());
    }
    let n = upto.max(2 * have).max(1024);
    let positions: Vec<u32> = (0..n as u32).collect();
    let t = rope_tables(&positions, head_dim, theta, DType::F32, device)?;
    *tables = Some(t.clone());
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::stack_items;

    #[test]
    fn stacks_group_equal_lengths_under_the_cap() {
        // Items 2 and 5 have nothing to compress; at 10 elements a chunk and a cap of 100,
        // a stack holds three 3-chunk items or two 5-chunk ones, and an 11-chunk item
        // (over the cap alone) makes its own stack.
        let chunks = [3, 5, 0, 3, 3, 0, 5, 9, 3, 11];
        let got = stack_items(&chunks, 10, 100);
        let want = vec![
            (3, vec![0, 3, 4]),
            (5, vec![1, 6]),
            (9, vec![7]),
            (3, vec![8]),
            (11, vec![9]),
        ];
        assert_eq!(got, want);
        // Every item with chunks appears exactly once.
        let mut all: Vec<usize> = got.iter().flat_map(|(_, ids)| ids.clone()).collect();
        all.sort();
        assert_eq!(all, vec![0, 1, 3, 4, 6, 7, 8, 9]);
    }
}
