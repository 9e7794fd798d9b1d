//! Weight loading into plain tensors with Hugging Face names
//! (`model.layers.N.self_attn.q_proj.weight`, …): from GGUF (dequantized; llama-architecture
//! q/k rows un-permuted from llama.cpp's interleaved RoPE layout) or from safetensors.

use super::config::{Architecture, LlamaConfig};
use crate::{Error, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Undoes llama.cpp's q/k row permutation: GGUF rows of head `h` are ordered
/// `(i, half)` for `i < D/2`; Hugging Face orders them `(half, i)`.
///
/// `w` is `[n_heads · D, in]` with `D` even; anything else (`n_heads` 0 included) is an
/// error.
pub fn unpermute_qk(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if n_heads == 0 || out % n_heads != 0 || (out / n_heads) % 2 != 0 {
        return Err(Error::Model(format!(
            "unpermute_qk: weight {:?} does not split into {n_heads} heads of an even, non-zero head dim",
            w.dims()
        )));
    }
    let d = out / n_heads;
    Ok(w.reshape((n_heads, d / 2, 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))?
        .contiguous()?)
}

fn gguf_name_map(layers: usize) -> Vec<(String, String)> {
    let mut v = vec![
        ("token_embd.weight".to_string(), "model.embed_tokens.weight".to_string()),
        ("output_norm.weight".into(), "model.norm.weight".into()),
        ("output.weight".into(), "lm_head.weight".into()),
    ];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (g, h) in [
            ("attn_q.weight", "self_attn.q_proj.weight"),
            ("attn_k.weight", "self_attn.k_proj.weight"),
            ("attn_v.weight", "self_attn.v_proj.weight"),
            ("attn_q.bias", "self_attn.q_proj.bias"),
            ("attn_k.bias", "self_attn.k_proj.bias"),
            ("attn_v.bias", "self_attn.v_proj.bias"),
            ("attn_output.weight", "self_attn.o_proj.weight"),
            ("attn_norm.weight", "input_layernorm.weight"),
            ("ffn_gate.weight", "mlp.gate_proj.weight"),
            ("ffn_up.weight", "mlp.up_proj.weight"),
            ("ffn_down.weight", "mlp.down_proj.weight"),
            ("ffn_norm.weight", "post_attention_layernorm.weight"),
        ] {
            v.push((format!("blk.{i}.{g}"), format!("{p}.{h}")));
        }
    }
    v
}

/// Reads and dequantizes every tensor of a GGUF file into `dtype` on `device`, renamed to
/// Hugging Face names. `on_tensor(done, total)` reports progress.
pub fn load_gguf(
    path: &Path,
    content: &gguf_file::Content,
    cfg: &LlamaConfig,
    dtype: DType,
    device: &Device,
    mut on_tensor: impl FnMut(usize, usize),
) -> Result<HashMap<String, Tensor>> {
    let mut file =
        std::fs::File::open(path).map_err(|e| Error::Model(format!("cannot open {}: {e}", path.display())))?;
    let map = gguf_name_map(cfg.num_layers);
    let present: Vec<&(String, String)> = map
        .iter()
        .filter(|(g, _)| content.tensor_infos.contains_key(g))
        .collect();
    let mut out = HashMap::new();
    for (i, (g, h)) in present.iter().enumerate() {
        let q = content
            .tensor(&mut file, g, device)
            .map_err(|e| Error::Model(format!("{}: tensor `{g}`: {e}", path.display())))?;
        let mut t = q.dequantize(device)?;
        if cfg.arch == Architecture::Llama {
            if g.ends_with("attn_q.weight") {
                t = unpermute_qk(&t, cfg.num_heads)?;
            } else if g.ends_with("attn_k.weight") {
                t = unpermute_qk(&t, cfg.num_kv_heads)?;
            }
        }
        out.insert(h.clone(), t.to_dtype(dtype)?);
        on_tensor(i + 1, present.len());
    }
    Ok(out)
}

/// Loads safetensors files (a Hugging Face folder's shards) into `dtype` on `device`.
pub fn load_safetensors(
    files: &[std::path::PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    if files.is_empty() {
        return Err(Error::Model("no *.safetensors files given".into()));
    }
    let mut out = HashMap::new();
    for f in files {
        for (name, t) in
            candle_core::safetensors::load(f, device).map_err(|e| Error::Model(format!("{}: {e}", f.display())))?
        {
            out.insert(name, t.to_dtype(dtype)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::unpermute_qk;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn unpermute_qk_rejects_zero_or_uneven_heads() {
        let w = Tensor::zeros((8, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(unpermute_qk(&w, 2).is_ok());
        for heads in [0, 3, 8] {
            let e = unpermute_qk(&w, heads).unwrap_err().to_string();
            assert!(e.contains("unpermute_qk") && e.contains("[8, 3]"), "{heads}: {e}");
        }
    }
}
