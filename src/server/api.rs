//! The OpenAI request body the server accepts ([`GenerateRequest`]) and their conversion into an engine [`Request`]: every field is
//! checked here, and a bad one is an [`ApiError`] naming it.
//!
//! Fields the server does not know are ignored (clients send many); fields it knows but
//! cannot honour (`n` > 1, `logprobs`, `echo`) are rejected. `prompt`, `stop` and a
//! message's `content` accept several JSON shapes, so they arrive as
//! [`serde_json::Value`] and are read by hand, with messages that name the field.

use super::error::ApiError;
use crate::engine::{Request, SamplingParams};
use serde::Deserialize;
use serde_json::Value;

/// The body of both `POST /v1/completions` and `POST /v1/chat/completions` (one struct,
/// so that serde's errors name the field at fault): `prompt` for the first, `messages`
/// for the second.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerateRequest {
    /// Completions: a string, a list of one string, or a list of token ids.
    pub prompt: Option<Value>,
    /// Completions: not supported, must be absent or false.
    #[serde(default)]
    pub echo: bool,
    /// Chat: the conversation; the last turn is usually the user's.
    pub messages: Option<Vec<ChatMessage>>,
    /// Must be absent or the served model's id.
    pub model: Option<String>,
    /// Most tokens to generate (default: [`ServerConfig::default_max_tokens`](super::ServerConfig),
    /// cut to the room left in the context).
    pub max_tokens: Option<usize>,
    /// Newer name of `max_tokens` (chat).
    pub max_completion_tokens: Option<usize>,
    /// `0` = greedy (default 1).
    pub temperature: Option<f64>,
    /// Nucleus mass in (0, 1] (default 1).
    pub top_p: Option<f64>,
    /// Extension: keep the `top_k` most likely tokens; `0` or `-1` = off.
    pub top_k: Option<i64>,
    /// Seed of the request's generator (default: a fresh one per request).
    pub seed: Option<u64>,
    /// A stop string or a list of them.
    pub stop: Option<Value>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// `{"include_usage": true}` adds a last chunk with the token counts.
    pub stream_options: Option<StreamOptions>,
    /// Number of choices: only 1 is supported.
    pub n: Option<u32>,
    /// Not supported: must be absent, null or false.
    pub logprobs: Option<Value>,
    /// Extension: do not stop at the model's end-of-sequence tokens.
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `stream_options`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// One chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// `system` (or `developer`), `user` or `assistant`.
    pub role: String,
    /// A string, or a list of `{"type": "text", "text": ...}` parts (null for an
    /// assistant turn).
    #[serde(default)]
    pub content: Value,
}

/// A prompt read from a completion request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptInput {
    /// Text, encoded with the model's tokenizer.
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

impl GenerateRequest {
    /// Reads `prompt` (and rejects `echo`).
    pub fn prompt(&self) -> Result<PromptInput, ApiError> {
        if self.echo {
            return Err(ApiError::invalid(Some("echo".into()), "echo = true is not supported"));
        }
        let bad = || {
            ApiError::invalid(
                Some("prompt".into()),
                "prompt must be a non-empty string, a list of one string, or a list of token ids",
            )
        };
        let Some(prompt) = &self.prompt else {
            return Err(ApiError::invalid(Some("prompt".into()), "missing field `prompt`"));
        };
        match prompt {
            Value::String(s) => Ok(PromptInput::Text(s.clone())),
            Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                Ok(PromptInput::Text(a[0].as_str().unwrap_or_default().to_string()))
            }
            Value::Array(a) if a.iter().all(Value::is_u64) && !a.is_empty() => a
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| {
                        ApiError::invalid(Some("prompt".into()), format!("prompt[{i}] = {v} is not a token id"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(PromptInput::Tokens),
            Value::Array(a) if a.len() > 1 && a.iter().all(Value::is_string) => Err(ApiError::invalid(
                Some("prompt".into()),
                format!(
                    "prompt is a list of {} strings: only one prompt per request is supported",
                    a.len()
                ),
            )),
            _ => Err(bad()),
        }
    }
}

impl ChatMessage {
    /// The message's text: `content` as a string, or its text parts joined.
    pub fn text(&self, i: usize) -> Result<String, ApiError> {
        let param = || Some(format!("messages[{i}].content"));
        match &self.content {
            Value::String(s) => Ok(s.clone()),
            Value::Null if self.role == "assistant" => Ok(String::new()),
            Value::Array(parts) => {
                let mut out = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => out.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                param(),
                                format!("messages[{i}].content[{j}] must be {{\"type\": \"text\", \"text\": string}}"),
                            ))
                        }
                    }
                }
                Ok(out)
            }
            _ => Err(ApiError::invalid(
                param(),
                format!("messages[{i}].content must be a string or a list of text parts"),
            )),
        }
    }
}

impl GenerateRequest {
    /// Checks `model`, `n` and `logprobs` against what the server serves.
    pub fn check_unsupported(&self, served: &str) -> Result<(), ApiError> {
        if let Some(m) = &self.model {
            if m != served {
                let mut e = ApiError::invalid(
                    Some("model".into()),
                    format!("model {m:?} does not exist: this server serves {served:?}"),
                )
                .with_code("model_not_found");
                e.status = axum::http::StatusCode::NOT_FOUND;
                e.kind = "not_found_error";
                return Err(e);
            }
        }
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::invalid(
                Some("n".into()),
                format!("n = {n}: only n = 1 is supported"),
            ));
        }
        match &self.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(()),
            Some(v) => Err(ApiError::invalid(
                Some("logprobs".into()),
                format!("logprobs = {v} is not supported"),
            )),
        }
    }

    /// The stop strings: `stop` as one string or a list of non-empty strings.
    pub fn stop_strings(&self) -> Result<Vec<String>, ApiError> {
        let param = || Some("stop".to_string());
        match &self.stop {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(s)) if !s.is_empty() => Ok(vec![s.clone()]),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| match v.as_str() {
                    Some(s) if !s.is_empty() => Ok(s.to_string()),
                    _ => Err(ApiError::invalid(
                        param(),
                        format!("stop[{i}] = {v} must be a non-empty string"),
                    )),
                })
                .collect(),
            Some(v) => Err(ApiError::invalid(
                param(),
                format!("stop = {v} must be a non-empty string or a list of them"),
            )),
        }
    }

    /// The sampling settings (the engine checks their ranges again at submit).
    pub fn sampling(&self, default_seed: u64) -> Result<SamplingParams, ApiError> {
        let temperature = self.temperature.unwrap_or(1.0);
        if !temperature.is_finite() || temperature < 0.0 {
            return Err(ApiError::invalid(
                Some("temperature".into()),
                format!("temperature = {temperature} must be >= 0 (0 = greedy)"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                Some("top_p".into()),
                format!("top_p = {top_p} must be in (0, 1]"),
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::invalid(
                    Some("top_k".into()),
                    format!("top_k = {k} must be >= 1 (0 or -1 = off)"),
                ))
            }
        };
        Ok(SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: self.seed.unwrap_or(default_seed),
        })
    }

    /// The requested output length, if any (`max_completion_tokens` wins).
    pub fn max_tokens(&self) -> Option<usize> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// The engine request for the token ids `prompt`: `max_tokens` (or the default, cut
    /// to the room left below `max_seq_len`), sampling, stop strings.
    pub fn to_request(
        &self,
        prompt: Vec<u32>,
        default_max_tokens: usize,
        max_seq_len: usize,
        default_seed: u64,
    ) -> Result<Request, ApiError> {
        let room = max_seq_len.saturating_sub(prompt.len()).max(1);
        let max_new = self.max_tokens().unwrap_or(default_max_tokens.min(room));
        if max_new == 0 {
            return Err(ApiError::invalid(
                Some("max_tokens".into()),
                "max_tokens = 0 must be >= 1",
            ));
        }
        if prompt.len() + max_new > max_seq_len {
            return Err(ApiError::invalid(
                Some("max_tokens".into()),
                format!(
                    "the prompt ({} tokens) + max_tokens ({max_new}) = {} exceed the context of {max_seq_len} tokens",
                    prompt.len(),
                    prompt.len() + max_new
                ),
            )
            .with_code("context_length_exceeded"));
        }
        Ok(Request::tokens(prompt, max_new)
            .with_sampling(self.sampling(default_seed)?)
            .with_stop_strings(self.stop_strings()?)
            .with_ignore_eos(self.ignore_eos))
    }
}
