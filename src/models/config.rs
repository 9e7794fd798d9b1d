//! Model hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.

use crate::{Error, Result};
use candle_core::quantized::gguf_file;
use std::path::Path;

/// Architecture family of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM2, Mistral-style (no attention bias).
    Llama,
    /// Qwen2 (bias on q/k/v projections).
    Qwen2,
}

/// Shape of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Family.
    pub arch: Architecture,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP inner size.
    pub intermediate_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base.
    pub rope_theta: f64,
    /// Trained context length.
    pub max_position_embeddings: usize,
    /// Output projection shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (Qwen2).
    pub attention_bias: bool,
}

fn md_u(c: &gguf_file::Content, key: &str) -> Result<usize> {
    let v = c
        .metadata
        .get(key)
        .ok_or_else(|| Error::Model(format!("GGUF metadata key `{key}` missing")))?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .map_err(|e| Error::Model(format!("GGUF metadata `{key}`: {e}")))
}

fn md_f(c: &gguf_file::Content, key: &str) -> Option<f64> {
    c.metadata
        .get(key)
        .and_then(|v| v.to_f32().ok().map(|x| x as f64).or_else(|| v.to_f64().ok()))
}

impl LlamaConfig {
    /// Reads the shape from GGUF metadata (`llama` and `qwen2` architectures).
    pub fn from_gguf(c: &gguf_file::Content) -> Result<Self> {
        let arch_name = c
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok().cloned())
            .ok_or_else(|| Error::Model("GGUF has no `general.architecture`".into()))?;
        let arch = match arch_name.as_str() {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => {
                return Err(Error::Model(format!(
                    "unsupported architecture `{other}` (supported: llama, qwen2)"
                )))
            }
        };
        let a = arch_name.as_str();
        let hidden = md_u(c, &format!("{a}.embedding_length"))?;
        let heads = md_u(c, &format!("{a}.attention.head_count"))?;
        let kv = md_u(c, &format!("{a}.attention.head_count_kv")).unwrap_or(heads);
        let head_dim = md_u(c, &format!("{a}.rope.dimension_count")).unwrap_or(hidden / heads.max(1));
        let vocab = match c.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => return Err(Error::Model("GGUF has no `token_embd.weight`".into())),
        };
        Self {
            arch,
            hidden_size: hidden,
            intermediate_size: md_u(c, &format!("{a}.feed_forward_length"))?,
            vocab_size: vocab,
            num_layers: md_u(c, &format!("{a}.block_count"))?,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim,
            rms_norm_eps: md_f(c, &format!("{a}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            rope_theta: md_f(c, &format!("{a}.rope.freq_base")).unwrap_or(10_000.0),
            max_position_embeddings: md_u(c, &format!("{a}.context_length")).unwrap_or(4096),
            tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
            attention_bias: arch == Architecture::Qwen2,
        }
        .validated("GGUF metadata")
    }

    /// `self` when its shape is usable (heads, KV heads, head dim and layers >= 1, query
    /// heads a multiple of KV heads, an even head dim), else an error naming `source`.
    fn validated(self, source: &str) -> Result<Self> {
        let (h, kv, d, l) = (self.num_heads, self.num_kv_heads, self.head_dim, self.num_layers);
        if h == 0 || kv == 0 || d == 0 || l == 0 || h % kv != 0 || d % 2 != 0 {
            return Err(Error::Model(format!(
                "{source}: unusable shape: {h} heads, {kv} KV heads, head dim {d}, {l} layers \
                 (all must be >= 1, heads a multiple of KV heads, head dim even)"
            )));
        }
        Ok(self)
    }

    /// Reads a Hugging Face `config.json` (`LlamaForCausalLM`, `MistralForCausalLM`,
    /// `Qwen2ForCausalLM`).
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::Model(format!("cannot read {}: {e}", path.display())))?;
        let j: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Model(format!("{}: invalid JSON: {e}", path.display())))?;
        let u = |k: &str| -> Result<usize> {
            j.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| Error::Model(format!("{}: missing integer `{k}`", path.display())))
        };
        let model_type = j.get("model_type").and_then(|v| v.as_str()).unwrap_or("llama");
        let arch = match model_type {
            "llama" | "mistral" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => {
                return Err(Error::Model(format!(
                    "unsupported model_type `{other}` in {} (supported: llama, mistral, qwen2)",
                    path.display()
                )))
            }
        };
        let hidden = u("hidden_size")?;
        let heads = u("num_attention_heads")?;
        Self {
            arch,
            hidden_size: hidden,
            intermediate_size: u("intermediate_size")?,
            vocab_size: u("vocab_size")?,
            num_layers: u("num_hidden_layers")?,
            num_heads: heads,
            num_kv_heads: u("num_key_value_heads").unwrap_or(heads),
            head_dim: u("head_dim").unwrap_or(hidden / heads.max(1)),
            rms_norm_eps: j.get("rms_norm_eps").and_then(|v| v.as_f64()).unwrap_or(1e-5),
            rope_theta: j.get("rope_theta").and_then(|v| v.as_f64()).unwrap_or(10_000.0),
            max_position_embeddings: u("max_position_embeddings").unwrap_or(4096),
            tie_word_embeddings: j.get("tie_word_embeddings").and_then(|v| v.as_bool()).unwrap_or(false),
            attention_bias: arch == Architecture::Qwen2,
        }
        .validated(&path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::LlamaConfig;
    use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
    use candle_core::quantized::GgmlDType;
    use std::collections::HashMap;

    fn gguf(heads: u32, kv: u32) -> Content {
        let mut metadata = HashMap::new();
        metadata.insert("general.architecture".to_string(), Value::String("llama".into()));
        for (k, v) in [
            ("embedding_length", 64),
            ("attention.head_count", heads),
            ("attention.head_count_kv", kv),
            ("feed_forward_length", 128),
            ("block_count", 2),
        ] {
            metadata.insert(format!("llama.{k}"), Value::U32(v));
        }
        let mut tensor_infos = HashMap::new();
        tensor_infos.insert(
            "token_embd.weight".to_string(),
            TensorInfo {
                ggml_dtype: GgmlDType::F32,
                shape: (100, 64).into(),
                offset: 0,
            },
        );
        Content {
            magic: VersionedMagic::GgufV3,
            metadata,
            tensor_infos,
            tensor_data_offset: 0,
        }
    }

    #[test]
    fn gguf_with_zero_heads_is_an_error() {
        let c = LlamaConfig::from_gguf(&gguf(4, 2)).unwrap();
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (4, 2, 16));
        for (h, kv) in [(0, 0), (0, 2), (4, 0), (4, 3)] {
            let e = LlamaConfig::from_gguf(&gguf(h, kv)).unwrap_err().to_string();
            assert!(e.contains("GGUF") && e.contains("heads"), "{h}/{kv}: {e}");
        }
    }
}
