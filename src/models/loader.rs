//! One call from a model spec (`default`, a local path, or a Hub id) to a ready model,
//! tokenizer and chat template, with progress bars for fetch and load.

use super::config::LlamaConfig;
use super::fetch::{resolve_model, ModelSpec, ResolvedModel};
use super::llama::Llama;
use super::tokenizer::{read_gguf_content, tokenizer_from_file, tokenizer_from_gguf, TokenizerInfo};
use super::weights;
use crate::{Error, Result};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use tokenizers::Tokenizer;

/// A loaded model with its tokenizer.
pub struct LoadedModel {
    /// The decoder.
    pub model: Llama,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// BOS/EOS ids and chat template.
    pub info: TokenizerInfo,
    /// Where the weights came from.
    pub source: String,
}

fn bar(show: bool, len: u64, msg: &'static str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} tensors {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b.set_message(msg);
    b
}

/// The weight dtype named `f32`, `f16` or `bf16`; `None` picks f16 on CUDA and f32
/// elsewhere (the examples' `--dtype`).
pub fn dtype_by_name(name: Option<&str>, cuda: bool) -> Result<DType> {
    Ok(match name {
        None if cuda => DType::F16,
        None | Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        Some("bf16") => DType::BF16,
        Some(other) => {
            return Err(Error::Invalid {
                op: "dtype_by_name",
                msg: format!("unknown dtype {other} (f32, f16, bf16)"),
            })
        }
    })
}

/// Resolves `spec` (fetching it if needed) and loads weights in `dtype` on `device`.
pub fn load_model(spec: &ModelSpec, dtype: DType, device: &Device, show_progress: bool) -> Result<LoadedModel> {
    match resolve_model(spec, show_progress)? {
        ResolvedModel::Gguf(path) => {
            let content = read_gguf_content(&path)?;
            let cfg = LlamaConfig::from_gguf(&content)?;
            let tokenizer = tokenizer_from_gguf(&content)?;
            let info = TokenizerInfo::from_gguf(&content)?;
            let pb = bar(show_progress, 0, "load");
            let tensors = weights::load_gguf(&path, &content, &cfg, dtype, device, |done, total| {
                pb.set_length(total as u64);
                pb.set_position(done as u64);
            })?;
            pb.finish_and_clear();
            Ok(LoadedModel {
                model: Llama::from_tensors(cfg, tensors)?,
                tokenizer,
                info,
                source: path.display().to_string(),
            })
        }
        ResolvedModel::HfFolder(f) => {
            let cfg = LlamaConfig::from_hf_json(&f.config)?;
            let tok_path = f
                .tokenizer
                .clone()
                .ok_or_else(|| Error::Model(format!("{}: no tokenizer.json", f.dir.display())))?;
            let tokenizer = tokenizer_from_file(&tok_path)?;
            let info = TokenizerInfo::from_hf_dir(&f.dir, &tokenizer)?;
            let pb = bar(show_progress, 1, "load");
            let tensors = weights::load_safetensors(&f.weights, dtype, device)?;
            pb.finish_and_clear();
            Ok(LoadedModel {
                model: Llama::from_tensors(cfg, tensors)?,
                tokenizer,
                info,
                source: f.dir.display().to_string(),
            })
        }
    }
}
