//! Random-weight models at named shapes, for benchmarks: decode speed does not depend on
//! the weight values, and an 8B shape fits no machine a real 8B checkpoint could be
//! downloaded to here.
//!
//! ```no_run
//! use spinkv::models::random::{random_llama, shape_config};
//! use candle_core::{DType, Device};
//! # fn main() -> spinkv::Result<()> {
//! let cfg = shape_config("smollm2-135m").expect("a named shape");
//! let model = random_llama(cfg, DType::F32, &Device::Cpu, 7)?;
//! assert_eq!(model.config().num_layers, 30);
//! # Ok(()) }
//! ```

use super::config::{Architecture, LlamaConfig};
use super::Llama;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// Names accepted by [`shape_config`].
pub const SHAPES: &[&str] = &["llama3-8b", "qwen2-7b", "smollm2-135m"];

/// Standard deviation of the random weights (the usual initializer scale).
pub const WEIGHT_STD: f64 = 0.02;

/// The shape of a named model: `llama3-8b` (Llama-3.1-8B), `qwen2-7b` (Qwen2-7B, q/k/v
/// bias) or `smollm2-135m` (SmolLM2-135M, tied embeddings); `None` for other names.
pub fn shape_config(name: &str) -> Option<LlamaConfig> {
    // (family, hidden, FFN, vocabulary, layers, q heads, kv heads, rope θ, context, tied)
    #[rustfmt::skip]
    let (arch, hidden, ffn, vocab, layers, heads, kv, theta, ctx, tied) = match name {
        "llama3-8b" => (Architecture::Llama, 4096, 14336, 128_256, 32, 32, 8, 5e5, 131_072, false),
        "qwen2-7b" => (Architecture::Qwen2, 3584, 18944, 152_064, 28, 28, 4, 1e6, 131_072, false),
        "smollm2-135m" => (Architecture::Llama, 576, 1536, 49_152, 30, 9, 3, 1e5, 8192, true),
        _ => return None,
    };
    Some(LlamaConfig {
        arch,
        hidden_size: hidden,
        intermediate_size: ffn,
        vocab_size: vocab,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        max_position_embeddings: ctx,
        tie_word_embeddings: tied,
        attention_bias: arch == Architecture::Qwen2,
    })
}

/// Normal(0, `std`) values from a seeded generator on the host (splitmix64 +
/// Box–Muller): the CPU backend of candle cannot be seeded.
fn host_normal(n: usize, std: f64, seed: &mut u64) -> Vec<f32> {
    let mut next = || {
        *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (next().max(1e-300), next());
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let a = std::f64::consts::TAU * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// A [`Llama`] of shape `cfg` with weights drawn from N(0, [`WEIGHT_STD`]) (norm weights
/// 1, biases 0), in `dtype`, generated on `device` itself: on a GPU with candle's seeded
/// device generator (nothing crosses from the host, so an 8B shape needs no host
/// memory), on the CPU with a seeded host generator. The same seed gives the same
/// weights on the same device.
pub fn random_llama(cfg: LlamaConfig, dtype: DType, device: &Device, seed: u64) -> Result<Llama> {
    if !device.is_cpu() {
        device.set_seed(seed)?;
    }
    let mut state = seed;
    let mut randn = |dims: &[usize]| -> Result<Tensor> {
        let t = if device.is_cpu() {
            let n = dims.iter().product();
            Tensor::from_vec(host_normal(n, WEIGHT_STD, &mut state), dims, device)?
        } else {
            // curand draws f32 only: draw per tensor, then convert.
            Tensor::randn(0f32, WEIGHT_STD as f32, dims, device)?
        };
        Ok(t.to_dtype(dtype)?)
    };
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
    let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    if qd == 0 || kvd == 0 || h == 0 {
        return Err(Error::Config(format!("random_llama: empty shape {cfg:?}")));
    }
    let mut t = HashMap::new();
    t.insert("model.embed_tokens.weight".to_string(), randn(&[cfg.vocab_size, h])?);
    if !cfg.tie_word_embeddings {
        t.insert("lm_head.weight".to_string(), randn(&[cfg.vocab_size, h])?);
    }
    let ones = |n: usize| Tensor::ones(n, dtype, device);
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        for (n, out, inp) in [
            ("self_attn.q_proj", qd, h),
            ("self_attn.k_proj", kvd, h),
            ("self_attn.v_proj", kvd, h),
            ("self_attn.o_proj", h, qd),
            ("mlp.gate_proj", f, h),
            ("mlp.up_proj", f, h),
            ("mlp.down_proj", h, f),
        ] {
            t.insert(format!("{p}.{n}.weight"), randn(&[out, inp])?);
            if cfg.attention_bias && !n.ends_with("o_proj") && n.starts_with("self_attn") {
                t.insert(format!("{p}.{n}.bias"), Tensor::zeros(out, dtype, device)?);
            }
        }
        t.insert(format!("{p}.input_layernorm.weight"), ones(h)?);
        t.insert(format!("{p}.post_attention_layernorm.weight"), ones(h)?);
    }
    t.insert("model.norm.weight".to_string(), ones(h)?);
    Llama::from_tensors(cfg, t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> LlamaConfig {
        LlamaConfig {
            num_layers: 2,
            hidden_size: 32,
            intermediate_size: 48,
            vocab_size: 100,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            ..shape_config("qwen2-7b").unwrap()
        }
    }

    #[test]
    fn named_shapes() {
        let l = shape_config("llama3-8b").unwrap();
        assert_eq!(
            (l.num_layers, l.hidden_size, l.num_heads, l.num_kv_heads, l.head_dim),
            (32, 4096, 32, 8, 128)
        );
        let q = shape_config("qwen2-7b").unwrap();
        assert_eq!((q.head_dim, q.vocab_size, q.attention_bias), (128, 152_064, true));
        let s = shape_config("smollm2-135m").unwrap();
        assert_eq!((s.head_dim, s.tie_word_embeddings), (64, true));
        assert!(shape_config("gpt2").is_none());
    }

    #[test]
    fn shapes_and_seed_determinism() -> Result<()> {
        let m = random_llama(tiny(), DType::F32, &Device::Cpu, 3)?;
        let mut cache = crate::SpinCache::new(m.cache_config(64, 1.0), crate::partition::Dense)?;
        let seq = crate::SparseKvCache::add_sequence(&mut cache)?;
        let logits = m.forward(&mut cache, &[(seq, &[1, 2, 3])])?;
        assert_eq!(logits.dims(), &[1, 100]);
        let again = random_llama(tiny(), DType::F32, &Device::Cpu, 3)?;
        let mut cache2 = crate::SpinCache::new(again.cache_config(64, 1.0), crate::partition::Dense)?;
        let seq2 = crate::SparseKvCache::add_sequence(&mut cache2)?;
        let same = again.forward(&mut cache2, &[(seq2, &[1, 2, 3])])?;
        let diff = (logits - same)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        let v = host_normal(10_000, 1.0, &mut 5);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / 1e4;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / 1e4;
        assert!(mean.abs() < 0.05 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
        Ok(())
    }
}
