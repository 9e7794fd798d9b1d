//! What a client asks the engine for: [`Request`] (prompt, output length, sampling,
//! stop conditions) and [`SamplingParams`], with the validation `submit` runs before a
//! request is queued. Every rejection is an [`Error::Invalid`] whose message names the
//! field and its value.

use crate::{Error, Result};
use std::sync::Arc;
use tokenizers::Tokenizer;

/// Identifier of a request, unique within one engine (assigned by `submit`, increasing
/// in submission order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "req-{}", self.0)
    }
}

/// The prompt of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Token ids, fed as they are (no BOS is added).
    Tokens(Vec<u32>),
    /// Text, encoded with the engine's tokenizer (`add_special_tokens = true`: the BOS
    /// is added when the model asks for it). Needs an engine built with a tokenizer.
    Text(String),
}

/// How the next token is picked, per request.
///
/// `temperature == 0` is greedy (argmax; `top_k`, `top_p` and `seed` are then unused).
/// Otherwise the logits are divided by `temperature`, cut to the `top_k` largest
/// (`0` = no cut; ties at the cut kept), then to the smallest set whose probability
/// reaches `top_p`, and a token is drawn from what is left by a Gumbel-max draw keyed by
/// `seed` and the request's draw counter ([`ops::sample_rows`](crate::ops::sample_rows)):
/// the same request with the same seed gives the same tokens, whatever else runs in the
/// batch and whether the step ran eagerly or as a CUDA graph (up to float rounding that
/// moves a token across a cut).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// `0` = greedy; otherwise `> 0`, finite.
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens; `0` disables the cut.
    pub top_k: usize,
    /// Nucleus mass in `(0, 1]`; `1` disables it.
    pub top_p: f64,
    /// Seed of this request's draws.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Greedy.
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    /// Greedy decoding (argmax).
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 299_792_458,
        }
    }

    /// Temperature sampling with the given seed (no top-k, no top-p).
    pub fn random(temperature: f64, seed: u64) -> Self {
        Self {
            temperature,
            seed,
            ..Self::greedy()
        }
    }

    /// Whether this is greedy decoding (`temperature == 0`).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks every field; the error names the field and its value.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "SamplingParams::validate";
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            crate::invalid!(
                OP,
                "temperature = {} must be finite and >= 0 (0 = greedy)",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            crate::invalid!(OP, "top_p = {} must be in (0, 1] (1 = off)", self.top_p);
        }
        Ok(())
    }
}

/// One generation request.
///
/// ```
/// use spinkv::engine::{Request, SamplingParams};
/// let req = Request::text("The capital of France is", 16)
///     .with_sampling(SamplingParams { temperature: 0.7, top_p: 0.9, ..SamplingParams::greedy() })
///     .with_stop_strings(["\n"]);
/// assert!(req.validate().is_ok());
/// assert!(Request::tokens(vec![1, 2, 3], 0).validate().is_err()); // max_new_tokens = 0
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The prompt (at least one token once encoded).
    pub prompt: Prompt,
    /// Most tokens to generate (`>= 1`). Prompt plus this must fit the cache's
    /// `max_seq_len`.
    pub max_new_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Token ids that end generation (the stop token is not part of the output). The
    /// engine's [`eos_token_ids`](super::EngineConfig::eos_token_ids) are added unless
    /// `ignore_eos`.
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation: the output text ends before the first occurrence
    /// (the tokens that produced it stay in the output tokens). Needs a tokenizer.
    pub stop_strings: Vec<String>,
    /// Do not stop at the engine's end-of-sequence tokens (benchmarks with a fixed
    /// output length). `stop_token_ids` still apply.
    pub ignore_eos: bool,
}

impl Request {
    /// A greedy request for `max_new_tokens` tokens after the token ids `prompt`.
    pub fn tokens(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        Self::new(Prompt::Tokens(prompt), max_new_tokens)
    }

    /// A greedy request for `max_new_tokens` tokens after the text `prompt`.
    pub fn text(prompt: impl Into<String>, max_new_tokens: usize) -> Self {
        Self::new(Prompt::Text(prompt.into()), max_new_tokens)
    }

    /// A greedy request without stop conditions other than the engine's EOS tokens.
    pub fn new(prompt: Prompt, max_new_tokens: usize) -> Self {
        Self {
            prompt,
            max_new_tokens,
            sampling: SamplingParams::greedy(),
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            ignore_eos: false,
        }
    }

    /// Sets the sampling settings.
    pub fn with_sampling(mut self, sampling: SamplingParams) -> Self {
        self.sampling = sampling;
        self
    }

    /// Adds stop token ids.
    pub fn with_stop_token_ids(mut self, ids: impl IntoIterator<Item = u32>) -> Self {
        self.stop_token_ids.extend(ids);
        self
    }

    /// Adds stop strings.
    pub fn with_stop_strings<S: Into<String>>(mut self, stops: impl IntoIterator<Item = S>) -> Self {
        self.stop_strings.extend(stops.into_iter().map(Into::into));
        self
    }

    /// Sets [`ignore_eos`](Self::ignore_eos).
    pub fn with_ignore_eos(mut self, ignore: bool) -> Self {
        self.ignore_eos = ignore;
        self
    }

    /// Checks what can be checked without a model: a non-empty prompt, at least one new
    /// token, the sampling settings, no empty stop string. The engine's `submit` also
    /// checks the encoded prompt against the vocabulary, `max_seq_len` and the cache
    /// capacity.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "Request::validate";
        match &self.prompt {
            Prompt::Tokens(t) if t.is_empty() => crate::invalid!(OP, "prompt is empty (0 tokens)"),
            Prompt::Text(s) if s.is_empty() => crate::invalid!(OP, "prompt is empty (\"\")"),
            _ => {}
        }
        if self.max_new_tokens == 0 {
            crate::invalid!(OP, "max_new_tokens = 0 must be >= 1");
        }
        self.sampling.validate().map_err(|e| match e {
            Error::Invalid { msg, .. } => Error::Invalid { op: OP, msg },
            e => e,
        })?;
        if let Some(i) = self.stop_strings.iter().position(|s| s.is_empty()) {
            crate::invalid!(OP, "stop_strings[{i}] is empty");
        }
        Ok(())
    }
}

/// What `submit` checks a request against, fixed when the engine is built (shared by
/// [`Engine`](super::Engine) and its clients so that requests are encoded and
/// validated on the submitting thread).
#[derive(Clone)]
pub(crate) struct Limits {
    pub(crate) tokenizer: Option<Arc<Tokenizer>>,
    pub(crate) vocab_size: usize,
    pub(crate) max_seq_len: usize,
    pub(crate) page_size: usize,
    /// Pages per `page_size` tokens of one sequence (layers × KV heads).
    pub(crate) pages_per_block: usize,
    pub(crate) capacity_pages: usize,
    pub(crate) eos: Vec<u32>,
}

/// A validated request, ready to queue.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub(crate) prompt: Vec<u32>,
    pub(crate) max_new_tokens: usize,
    pub(crate) sampling: SamplingParams,
    pub(crate) stop_ids: Vec<u32>,
    pub(crate) stop_strings: Vec<String>,
    /// Cache pages reserved for prompt + `max_new_tokens`.
    pub(crate) pages: usize,
}

impl Limits {
    /// Validates and encodes `req`; the error names the field and its value.
    pub(crate) fn prepare(&self, req: Request) -> Result<Prepared> {
        const OP: &str = "Engine::submit";
        let rename = |e: Error| match e {
            Error::Invalid { msg, .. } => Error::Invalid { op: OP, msg },
            e => e,
        };
        req.validate().map_err(rename)?;
        let prompt = match req.prompt {
            Prompt::Tokens(t) => t,
            Prompt::Text(s) => {
                let Some(tok) = &self.tokenizer else {
                    crate::invalid!(OP, "prompt is text but the engine has no tokenizer: pass token ids");
                };
                let enc = tok
                    .encode(s.as_str(), true)
                    .map_err(|e| Error::Model(format!("{OP}: cannot encode the prompt: {e}")))?;
                enc.get_ids().to_vec()
            }
        };
        if prompt.is_empty() {
            crate::invalid!(OP, "prompt is empty (0 tokens once encoded)");
        }
        if let Some((i, &t)) = prompt.iter().enumerate().find(|(_, &t)| t as usize >= self.vocab_size) {
            crate::invalid!(
                OP,
                "prompt[{i}] = {t} is outside the vocabulary (vocab_size = {})",
                self.vocab_size
            );
        }
        if let Some((i, &t)) = req
            .stop_token_ids
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= self.vocab_size)
        {
            crate::invalid!(
                OP,
                "stop_token_ids[{i}] = {t} is outside the vocabulary (vocab_size = {})",
                self.vocab_size
            );
        }
        if prompt.len() >= self.max_seq_len {
            crate::invalid!(
                OP,
                "prompt has {} tokens, more than max_seq_len = {} allows (at most {} leave room for one new token)",
                prompt.len(),
                self.max_seq_len,
                self.max_seq_len - 1
            );
        }
        if prompt.len() + req.max_new_tokens > self.max_seq_len {
            crate::invalid!(
                OP,
                "prompt ({} tokens) + max_new_tokens ({}) = {} exceeds max_seq_len = {}",
                prompt.len(),
                req.max_new_tokens,
                prompt.len() + req.max_new_tokens,
                self.max_seq_len
            );
        }
        if !req.stop_strings.is_empty() && self.tokenizer.is_none() {
            crate::invalid!(OP, "stop_strings need an engine with a tokenizer");
        }
        let pages = (prompt.len() + req.max_new_tokens).div_ceil(self.page_size) * self.pages_per_block;
        if pages > self.capacity_pages {
            crate::invalid!(
                OP,
                "prompt ({} tokens) + max_new_tokens ({}) need {pages} cache pages, more than the cache holds \
                 ({} pages): the request could never be admitted",
                prompt.len(),
                req.max_new_tokens,
                self.capacity_pages
            );
        }
        let mut stop_ids = req.stop_token_ids;
        if !req.ignore_eos {
            stop_ids.extend(
                self.eos
                    .iter()
                    .copied()
                    .filter(|e| !stop_ids.contains(e))
                    .collect::<Vec<_>>(),
            );
        }
        Ok(Prepared {
            prompt,
            max_new_tokens: req.max_new_tokens,
            sampling: req.sampling,
            stop_ids,
            stop_strings: req.stop_strings,
            pages,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(r: Request) -> String {
        r.validate().unwrap_err().to_string()
    }

    #[test]
    fn validation_names_the_field_and_value() {
        assert!(Request::tokens(vec![1], 1).validate().is_ok());
        assert!(msg(Request::tokens(vec![], 4)).contains("prompt is empty"));
        assert!(msg(Request::text("", 4)).contains("prompt is empty"));
        assert!(msg(Request::tokens(vec![1], 0)).contains("max_new_tokens = 0"));
        let bad_t = Request::tokens(vec![1], 1).with_sampling(SamplingParams::random(-0.5, 1));
        assert!(msg(bad_t).contains("temperature = -0.5"));
        for p in [0.0, 1.5, f64::NAN] {
            let r = Request::tokens(vec![1], 1).with_sampling(SamplingParams {
                top_p: p,
                ..SamplingParams::random(1.0, 1)
            });
            assert!(msg(r).contains("top_p ="), "top_p {p}");
        }
        assert!(msg(Request::tokens(vec![1], 1).with_stop_strings([""])).contains("stop_strings[0]"));
    }
}
