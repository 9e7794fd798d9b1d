//! An OpenAI-compatible HTTP server over an [`EngineClient`] (feature `server`, on by
//! default): axum on tokio.
//!
//! * `POST /v1/completions` — `prompt` (a string, a list of one string, or token ids);
//! * `POST /v1/chat/completions` — `messages`, rendered with the model's chat format
//!   ([`TokenizerInfo::chat_format`](crate::models::tokenizer::TokenizerInfo::chat_format));
//! * both take `model`, `max_tokens` (`max_completion_tokens`), `temperature` (default
//!   1; 0 = greedy), `top_p`, `top_k` (an extension), `seed`, `stop` (a string or a
//!   list), `stream` (server-sent events: `data: {chunk}` lines, then `data: [DONE]`;
//!   `stream_options.include_usage` adds a usage chunk) and answer with `usage` token
//!   counts and `finish_reason` `stop` / `length`;
//! * `GET /v1/models`, `GET /health`.
//!
//! Every bad request — malformed JSON, a field of the wrong type, an unknown model, an
//! invalid value, a prompt over [`ServerConfig::max_prompt_tokens`], anything
//! [`EngineClient::submit`] rejects — is a 4xx with an OpenAI error body
//! `{"error": {"message", "type", "param", "code"}}` naming the problem, and the server
//! goes on serving. A client that disconnects cancels its request, whose pages are then
//! freed.
//!
//! ```no_run
//! # fn main() -> spinkv::Result<()> {
//! # let client: spinkv::engine::EngineClient = unimplemented!();
//! use spinkv::server::{serve, ServerConfig};
//! let rt = tokio::runtime::Runtime::new().unwrap();
//! let addr = "127.0.0.1:8000".parse().unwrap();
//! rt.block_on(serve(addr, client, ServerConfig::new("SmolLM2-135M-Instruct"))).unwrap();
//! # Ok(()) }
//! ```

mod api;
mod chat;
mod error;
mod handlers;

pub use api::{ChatMessage, GenerateRequest, PromptInput, StreamOptions};
pub use chat::render_messages;
pub use error::ApiError;
pub use handlers::POLL;

use crate::engine::EngineClient;
use crate::models::tokenizer::ChatTemplate;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

/// What the server says about itself and the limits it applies on top of the engine's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// The model id `GET /v1/models` lists and responses carry; a request naming
    /// another model gets a 404.
    pub model_id: String,
    /// Longest prompt accepted, in tokens (`None`: up to the engine's
    /// `max_seq_len - 1`). Longer prompts get a 400 (`context_length_exceeded`).
    pub max_prompt_tokens: Option<usize>,
    /// `max_tokens` of a request that gives none (cut to the room left in the context).
    pub default_max_tokens: usize,
    /// Largest request body accepted, in bytes (default 32 MiB).
    pub max_body_bytes: usize,
}

impl ServerConfig {
    /// Defaults for the model `model_id`: prompts up to the engine's limit, 256 new
    /// tokens by default, 32 MiB bodies.
    pub fn new(model_id: impl Into<String>) -> Self {
        Self {
            model_id: model_id.into(),
            max_prompt_tokens: None,
            default_max_tokens: 256,
            max_body_bytes: 32 << 20,
        }
    }
}

/// What every handler shares.
pub(crate) struct AppState {
    pub(crate) client: EngineClient,
    pub(crate) cfg: ServerConfig,
    pub(crate) chat_format: ChatTemplate,
    pub(crate) created: u64,
}

impl AppState {
    pub(crate) fn max_prompt_tokens(&self) -> usize {
        let engine = self.client.max_seq_len().saturating_sub(1);
        self.cfg.max_prompt_tokens.map_or(engine, |m| m.min(engine))
    }
}

/// The routes, over `client` (the engine already spawned, [`Engine::spawn`](crate::engine::Engine::spawn)).
pub fn router(client: EngineClient, cfg: ServerConfig) -> Router {
    let chat_format = client.tokenizer_info().map_or(ChatTemplate::Plain, |i| i.chat_format());
    let limit = cfg.max_body_bytes;
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let state = Arc::new(AppState {
        client,
        cfg,
        chat_format,
        created,
    });
    Router::new()
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/models", get(handlers::models))
        .route("/health", get(handlers::health))
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Binds `addr` and serves until the task is dropped or the listener fails.
pub async fn serve(addr: SocketAddr, client: EngineClient, cfg: ServerConfig) -> std::io::Result<()> {
    serve_on(TcpListener::bind(addr).await?, client, cfg).await
}

/// Serves on a listener already bound (e.g. to `127.0.0.1:0`, reading the port from
/// [`TcpListener::local_addr`]).
pub async fn serve_on(listener: TcpListener, client: EngineClient, cfg: ServerConfig) -> std::io::Result<()> {
    axum::serve(listener, router(client, cfg)).await
}
