//! Text generation over a [`Llama`] and any [`SparseKvCache`]: chunked prefill with a
//! progress bar, then token-by-token decode with streaming output and timings.

use super::llama::Llama;
use super::sampling::Sampler;
use crate::{Error, Result, SeqId, SparseKvCache};
use indicatif::{ProgressBar, ProgressStyle};
use std::time::Instant;
use tokenizers::Tokenizer;

/// Timings and tokens of one generation.
#[derive(Debug, Clone, Default)]
pub struct GenerationReport {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub tokens: Vec<u32>,
    /// Prefill wall time, seconds.
    pub prefill_secs: f64,
    /// Decode wall time, seconds.
    pub decode_secs: f64,
}

impl GenerationReport {
    /// Prompt tokens per second.
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    /// Generated tokens per second (the first token comes from the prefill).
    pub fn decode_tps(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// Feeds `prompt` to `seq` in chunks of `chunk` tokens and returns the last logits.
pub fn prefill(
    model: &Llama,
    cache: &mut dyn SparseKvCache,
    seq: SeqId,
    prompt: &[u32],
    chunk: usize,
    show_progress: bool,
) -> Result<candle_core::Tensor> {
    if prompt.is_empty() {
        return Err(Error::Invalid {
            op: "prefill",
            msg: "empty prompt".into(),
        });
    }
    let pb = if show_progress && prompt.len() > chunk {
        let b = ProgressBar::new(prompt.len() as u64);
        b.set_style(
            ProgressStyle::with_template("   prefill [{bar:40}] {pos}/{len} tokens {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let mut logits = None;
    for part in prompt.chunks(chunk.max(1)) {
        logits = Some(model.forward(cache, &[(seq, part)])?);
        pb.inc(part.len() as u64);
    }
    pb.finish_and_clear();
    logits.ok_or_else(|| Error::Invalid {
        op: "prefill",
        msg: "no logits".into(),
    })
}

/// Generates up to `max_new` tokens after `prompt`, stopping at any of `eos`;
/// `on_text` receives each new piece of decoded text as soon as it is complete.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    model: &Llama,
    cache: &mut dyn SparseKvCache,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    max_new: usize,
    eos: &[u32],
    sampler: &mut Sampler,
    show_progress: bool,
    mut on_text: impl FnMut(&str),
) -> Result<GenerationReport> {
    let seq = cache.add_sequence()?;
    let result = (|| {
        let t0 = Instant::now();
        let mut logits = prefill(model, cache, seq, prompt, 512, show_progress)?;
        let mut rep = GenerationReport {
            prompt_tokens: prompt.len(),
            prefill_secs: t0.elapsed().as_secs_f64(),
            ..Default::default()
        };
        let t1 = Instant::now();
        let mut printed = String::new();
        for _ in 0..max_new {
            let next = sampler.sample(&logits.get(0)?)?;
            if eos.contains(&next) {
                break;
            }
            rep.tokens.push(next);
            let text = tokenizer
                .decode(&rep.tokens, true)
                .map_err(|e| Error::Model(format!("decode: {e}")))?;
            if text.len() > printed.len() && !text.ends_with('\u{FFFD}') && text.starts_with(&printed) {
                on_text(&text[printed.len()..]);
                printed = text;
            }
            if rep.tokens.len() == max_new {
                break;
            }
            logits = model.forward(cache, &[(seq, &[next])])?;
        }
        rep.decode_secs = t1.elapsed().as_secs_f64();
        Ok(rep)
    })();
    cache.remove_sequence(seq)?;
    result
}
