//! A Llama-family decoder written against `&mut dyn SparseKvCache`: any algorithm plugs
//! in. Ragged batches: each sequence brings its own new tokens; one call is one step.
//!
//! Logits are computed in f32 by default even when the weights are f16/bf16: rounded to
//! bf16 (8-bit mantissa), the top two logits of SmolLM2-135M tie on an ordinary prompt
//! and greedy decoding takes the wrong token (the same happens with
//! candle-transformers' Llama in bf16). [`Llama::set_f32_logits`] trades that back for
//! memory.

use super::config::LlamaConfig;
use crate::ops::{add_rms_norm, rms_norm, silu_mul};
use crate::{CacheConfig, Error, Result, SeqId, SparseKvCache, StepInput};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear};
use std::collections::HashMap;

/// An RMSNorm's weight `[hidden]` and epsilon (applied by the fused ops of
/// [`crate::ops::model_ops`]).
#[derive(Clone)]
struct Norm {
    alpha: Tensor,
    eps: f32,
}

impl Norm {
    fn new(alpha: Tensor, eps: f64) -> Self {
        Self { alpha, eps: eps as f32 }
    }
}

#[derive(Clone)]
struct Block {
    attn_norm: Norm,
    /// q, k and v projections fused into one GEMM: rows `[Hq·D | Hkv·D | Hkv·D]`.
    qkv: Linear,
    o: Linear,
    mlp_norm: Norm,
    /// gate and up projections fused into one GEMM: rows `[inter | inter]`.
    gate_up: Linear,
    down: Linear,
}

/// One linear layer from several stacked along the output dimension (one GEMM).
fn fuse(parts: &[Linear]) -> Result<Linear> {
    let w: Vec<&Tensor> = parts.iter().map(|l| l.weight()).collect();
    let bias = match parts.iter().map(|l| l.bias()).collect::<Option<Vec<&Tensor>>>() {
        Some(b) => Some(Tensor::cat(&b, 0)?),
        None => None,
    };
    Ok(Linear::new(Tensor::cat(&w, 0)?, bias))
}

/// Llama / SmolLM2 / Mistral-style / Qwen2 decoder. `Clone` shares the weights (tensors
/// are reference-counted): one loaded model can serve several engines or caches.
#[derive(Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Norm,
    lm_head: Linear,
    /// The output projection in f32, when the weights are f16/bf16 on the CPU and f32
    /// logits are on.
    lm_head_f32: Option<Linear>,
    /// f32 logits from the f16/bf16 projection itself ([`crate::ops::logits_f32`]: one
    /// GEMM with f32 output, no f32 copy), when the weights are on CUDA and f32 logits
    /// are on.
    gemm_f32_logits: bool,
    dtype: DType,
    device: Device,
}

fn take(t: &mut HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    t.remove(name)
        .ok_or_else(|| Error::Model(format!("weight `{name}` missing from the checkpoint")))
}

impl Llama {
    /// Builds the model from tensors with Hugging Face names (see
    /// [`weights`](super::weights)); all tensors must already be in one dtype and device.
    pub fn from_tensors(cfg: LlamaConfig, mut t: HashMap<String, Tensor>) -> Result<Self> {
        let embed_w = take(&mut t, "model.embed_tokens.weight")?;
        let (dtype, device) = (embed_w.dtype(), embed_w.device().clone());
        if embed_w.dims() != [cfg.vocab_size, cfg.hidden_size] {
            return Err(Error::Model(format!(
                "embedding is {:?}, config says [{}, {}]",
                embed_w.dims(),
                cfg.vocab_size,
                cfg.hidden_size
            )));
        }
        let lm_head = match t.remove("lm_head.weight") {
            Some(w) if !cfg.tie_word_embeddings => Linear::new(w, None),
            _ => Linear::new(embed_w.clone(), None),
        };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let mut lin = |n: &str, bias: bool| -> Result<Linear> {
                let w = take(&mut t, &format!("{p}.{n}.weight"))?;
                let b = if bias {
                    Some(take(&mut t, &format!("{p}.{n}.bias"))?)
                } else {
                    None
                };
                Ok(Linear::new(w, b))
            };
            let bias = cfg.attention_bias;
            let (q, k, v, o) = (
                lin("self_attn.q_proj", bias)?,
                lin("self_attn.k_proj", bias)?,
                lin("self_attn.v_proj", bias)?,
                lin("self_attn.o_proj", false)?,
            );
            let (gate, up, down) = (
                lin("mlp.gate_proj", false)?,
                lin("mlp.up_proj", false)?,
                lin("mlp.down_proj", false)?,
            );
            let attn_norm = Norm::new(take(&mut t, &format!("{p}.input_layernorm.weight"))?, cfg.rms_norm_eps);
            let mlp_norm = Norm::new(
                take(&mut t, &format!("{p}.post_attention_layernorm.weight"))?,
                cfg.rms_norm_eps,
            );
            blocks.push(Block {
                attn_norm,
                qkv: fuse(&[q, k, v])?,
                o,
                mlp_norm,
                gate_up: fuse(&[gate, up])?,
                down,
            });
        }
        let norm = Norm::new(take(&mut t, "model.norm.weight")?, cfg.rms_norm_eps);
        let mut model = Self {
            embed: Embedding::new(embed_w, cfg.hidden_size),
            blocks,
            norm,
            lm_head,
            lm_head_f32: None,
            gemm_f32_logits: false,
            cfg,
            dtype,
            device,
        };
        model.set_f32_logits(true)?;
        Ok(model)
    }

    /// Whether logits are computed in f32 for f16/bf16 weights (default: on; no effect
    /// for f32 weights). On CUDA the projection's products are accumulated and written in
    /// f32 by one GEMM ([`crate::ops::logits_f32`]), with no extra memory. On the CPU, on
    /// keeps an f32 copy of the projection (vocab × hidden × 4 bytes: 113 MB for
    /// SmolLM2-135M). Off computes logits in the weights' dtype, where near-equal logits
    /// can round to a tie (see the module docs).
    pub fn set_f32_logits(&mut self, on: bool) -> Result<()> {
        let half = on && self.dtype != DType::F32;
        self.gemm_f32_logits = half && self.device.is_cuda();
        self.lm_head_f32 = if half && !self.gemm_f32_logits {
            Some(Linear::new(self.lm_head.weight().to_dtype(DType::F32)?, None))
        } else {
            None
        };
        Ok(())
    }

    /// Whether logits are computed in f32 (always for f32 weights).
    pub fn f32_logits(&self) -> bool {
        self.dtype == DType::F32 || self.lm_head_f32.is_some() || self.gemm_f32_logits
    }

    /// The model's shape.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Weight dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Weight device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A cache configuration matching this model (layers, heads, head_dim, θ, dtype,
    /// device) with room for `max_tokens` tokens in total and a fast tier of
    /// `fast_fraction` of it; `max_seq_len` defaults to the model's trained context.
    pub fn cache_config(&self, max_tokens: usize, fast_fraction: f64) -> CacheConfig {
        let mut c = CacheConfig::new(
            self.cfg.num_layers,
            self.cfg.num_heads,
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
        );
        c.rope_theta = self.cfg.rope_theta;
        c.dtype = self.dtype;
        c.device = self.device.clone();
        c.max_seq_len = self.cfg.max_position_embeddings.max(max_tokens);
        c.with_token_capacity(max_tokens, fast_fraction)
    }

    /// A cache configuration for `sequences` sequences of up to `seq_tokens` tokens each
    /// (prompt + output) with `page_size`-token pages: the host tier holds every
    /// sequence's pages rounded up per sequence (so all of them fit at once), the fast
    /// tier `fast_fraction` of that; `max_sequences` is `sequences` and `max_seq_len` at
    /// least `seq_tokens`. `None` when the token count overflows.
    pub fn cache_config_for(
        &self,
        sequences: usize,
        seq_tokens: usize,
        page_size: usize,
        fast_fraction: f64,
    ) -> Option<CacheConfig> {
        let per_seq = seq_tokens.div_ceil(page_size.max(1)).checked_mul(page_size.max(1))?;
        let mut c = self.cache_config(1, fast_fraction);
        c.page_size = page_size;
        c = c.with_token_capacity(sequences.checked_mul(per_seq)?, fast_fraction);
        c.max_sequences = sequences.max(1);
        c.max_seq_len = c.max_seq_len.max(seq_tokens);
        Some(c)
    }

    /// One step over a ragged batch: each `(seq, tokens)` appends `tokens` to `seq`.
    /// Returns the next-token logits of each sequence, `[B, vocab]` f32. On error the
    /// step is aborted, leaving the cache as before.
    pub fn forward(&self, cache: &mut dyn SparseKvCache, batch: &[(SeqId, &[u32])]) -> Result<Tensor> {
        let inputs: Vec<StepInput> = batch
            .iter()
            .map(|(seq, toks)| StepInput {
                seq: *seq,
                new_tokens: toks.len(),
            })
            .collect();
        let ids: Vec<u32> = batch.iter().flat_map(|(_, t)| t.iter().copied()).collect();
        self.check_token_ids("Llama::forward", ids.iter().copied())?;
        let span = crate::host_timing::span("model.begin_step");
        cache.begin_step(&inputs)?;
        drop(span);
        let span = crate::host_timing::span("model.layers");
        let out = self.step(cache, batch, &ids);
        drop(span);
        match out {
            Ok(l) => {
                let _span = crate::host_timing::span("model.end_step");
                cache.end_step()?;
                Ok(l)
            }
            Err(e) => {
                cache.abort_step()?;
                Err(e)
            }
        }
    }

    /// Fails with [`Error::Invalid`] naming `op` when a token id is outside the vocabulary.
    pub fn check_token_ids(&self, op: &'static str, ids: impl IntoIterator<Item = u32>) -> Result<()> {
        match ids.into_iter().find(|&i| i as usize >= self.cfg.vocab_size) {
            Some(bad) => Err(Error::Invalid {
                op,
                msg: format!("token id {bad} outside the vocabulary ({})", self.cfg.vocab_size),
            }),
            None => Ok(()),
        }
    }

    /// The body of a padded decode step: `ids` `[B]` u32 on the model's device, one
    /// token per row, for the step the cache opened with
    /// [`SparseKvCache::begin_padded_decode`] (padding rows: any id in the vocabulary).
    /// Returns `[B, vocab]` f32 logits (padding rows unspecified). It uploads nothing
    /// and reads nothing back (the cache refuses padded steps where it would, e.g. with
    /// `CacheConfig::reject_non_finite`), and its device work depends only on the step's shape: a
    /// CUDA graph captured from one call replays any later step of that shape (see
    /// `spinkv::engine`). The caller ends (or aborts) the step.
    pub fn forward_padded(&self, cache: &mut dyn SparseKvCache, ids: &Tensor) -> Result<Tensor> {
        if ids.rank() != 1 || ids.dtype() != DType::U32 || !ids.device().same_device(&self.device) {
            return Err(Error::Invalid {
                op: "Llama::forward_padded",
                msg: format!(
                    "ids must be [B] u32 on {:?}, got {:?} {:?} on {:?}",
                    self.device.location(),
                    ids.dims(),
                    ids.dtype(),
                    ids.device().location()
                ),
            });
        }
        self.head(&self.layers(cache, ids)?)
    }

    fn step(&self, cache: &mut dyn SparseKvCache, batch: &[(SeqId, &[u32])], ids: &[u32]) -> Result<Tensor> {
        let t = ids.len();
        let ids = Tensor::from_vec(ids.to_vec(), t, &self.device)?;
        let x = self.layers(cache, &ids)?;
        let mut last = Vec::with_capacity(batch.len());
        let mut end = 0u32;
        for (_, toks) in batch {
            end += toks.len() as u32;
            last.push(end - 1);
        }
        let x = if last.len() == t {
            // One token per sequence (decode): every row samples.
            x
        } else {
            x.index_select(&Tensor::from_vec(last, batch.len(), &self.device)?, 0)?
        };
        self.head(&x)
    }

    /// Embedding, every layer and the final norm over token ids `[t]` u32; returns the
    /// normalized hidden states `[t, hidden]`. Each residual add is fused with the norm
    /// that follows it (the next layer's, or the final one).
    fn layers(&self, cache: &mut dyn SparseKvCache, ids: &Tensor) -> Result<Tensor> {
        let (c, t) = (&self.cfg, ids.dims1()?);
        let mut x = self.embed.forward(ids)?;
        let first = self.blocks.first().map_or(&self.norm, |b| &b.attn_norm);
        let mut h = rms_norm(&x, &first.alpha, first.eps)?;
        for (layer, b) in self.blocks.iter().enumerate() {
            let (hq, hkv) = (c.num_heads, c.num_kv_heads);
            let span = crate::host_timing::span("layer.qkv");
            let qkv = b.qkv.forward(&h)?.reshape((t, hq + 2 * hkv, c.head_dim))?;
            drop(span);
            let q = qkv.narrow(1, 0, hq)?;
            let k = qkv.narrow(1, hq, hkv)?;
            let v = qkv.narrow(1, hq + hkv, hkv)?;
            let a = cache
                .attend(layer, &q, &k, &v)?
                .reshape((t, c.num_heads * c.head_dim))?;
            let span = crate::host_timing::span("layer.mlp");
            let (x1, h1) = add_rms_norm(&x, &b.o.forward(&a)?, &b.mlp_norm.alpha, b.mlp_norm.eps)?;
            let m = silu_mul(&b.gate_up.forward(&h1)?)?;
            let next = self.blocks.get(layer + 1).map_or(&self.norm, |n| &n.attn_norm);
            (x, h) = add_rms_norm(&x1, &b.down.forward(&m)?, &next.alpha, next.eps)?;
            drop(span);
        }
        Ok(h)
    }

    /// `[n, hidden]` normalized hidden states → `[n, vocab]` f32 logits.
    fn head(&self, x: &Tensor) -> Result<Tensor> {
        if self.gemm_f32_logits {
            return crate::ops::logits_f32(x, self.lm_head.weight());
        }
        match &self.lm_head_f32 {
            Some(head) => Ok(head.forward(&x.to_dtype(DType::F32)?)?),
            None => Ok(self.lm_head.forward(x)?.to_dtype(DType::F32)?),
        }
    }
}
