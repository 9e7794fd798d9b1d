//! The endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (JSON or
//! server-sent events), `GET /v1/models`, `GET /health`.
//!
//! A generation request is encoded and submitted on a blocking thread (tokenizing a long
//! prompt would stall the async workers), which then forwards the handle's events to the
//! async side. When the client goes away (the response future or the SSE stream is
//! dropped), the forwarding thread sees the channel closed within
//! [`POLL`] and drops the handle, which cancels the request: it leaves the cache and
//! its pages are freed.

use super::api::{GenerateRequest, PromptInput};
use super::chat::render_messages;
use super::error::ApiError;
use super::AppState;
use crate::engine::{Completion, Event, FinishReason, RequestHandle};
use crate::models::tokenizer::ChatTemplate;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// How often a forwarding thread checks whether its client is still there.
pub const POLL: Duration = Duration::from_millis(50);

/// Which endpoint a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// `POST /v1/completions`.
pub(crate) async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Json<GenerateRequest>, JsonRejection>,
) -> Response {
    generate(st, body, Kind::Completion)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(
    State(st): State<Arc<AppState>>,
    body: Result<Json<GenerateRequest>, JsonRejection>,
) -> Response {
    generate(st, body, Kind::Chat)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `GET /v1/models`: the one model served.
pub(crate) async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.cfg.model_id,
            "object": "model",
            "created": st.created,
            "owned_by": "spinkv",
            "max_model_len": st.client.max_seq_len(),
        }]
    }))
}

/// `GET /health`: 200 with the engine's queue counts, or 503 once the engine thread has
/// stopped after an error.
pub(crate) async fn health(State(st): State<Arc<AppState>>) -> Response {
    if let Some(e) = st.client.fatal_error() {
        return ApiError::server(StatusCode::SERVICE_UNAVAILABLE, format!("the engine stopped: {e}")).into_response();
    }
    let m = st.client.metrics();
    Json(json!({"status": "ok", "running": m.running, "waiting": m.waiting})).into_response()
}

/// Any other path: 404 with an error body.
pub(crate) async fn not_found() -> ApiError {
    let mut e = ApiError::invalid(
        None,
        "no such endpoint: try POST /v1/completions, POST /v1/chat/completions, GET /v1/models or GET /health",
    );
    e.status = StatusCode::NOT_FOUND;
    e.kind = "not_found_error";
    e
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A seed for a request that gives none: different for every request.
fn fresh_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    nanos
        ^ COUNT
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// What a generation needs once the body is checked: the prompt (text and whether to
/// add special tokens, or ids) and the request.
struct Job {
    prompt: PromptInput,
    add_special_tokens: bool,
    req: GenerateRequest,
}

/// Encodes, checks the length, submits (on a blocking thread).
fn start(st: &AppState, job: &Job) -> Result<RequestHandle, ApiError> {
    let ids = match &job.prompt {
        PromptInput::Tokens(t) => t.clone(),
        PromptInput::Text(s) => {
            let tok = st.client.tokenizer().ok_or_else(|| {
                ApiError::invalid(Some("prompt".into()), "the engine has no tokenizer: send token ids")
            })?;
            tok.encode(s.as_str(), job.add_special_tokens)
                .map_err(|e| {
                    ApiError::server(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot encode the prompt: {e}"),
                    )
                })?
                .get_ids()
                .to_vec()
        }
    };
    let param = if job.req.messages.is_some() {
        "messages"
    } else {
        "prompt"
    };
    if ids.is_empty() {
        return Err(ApiError::invalid(
            Some(param.into()),
            format!("{param} is empty (0 tokens)"),
        ));
    }
    let max_prompt = st.max_prompt_tokens();
    if ids.len() > max_prompt {
        return Err(ApiError::invalid(
            Some(param.into()),
            format!(
                "{param} has {} tokens, more than the {max_prompt} this server accepts",
                ids.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let req = job
        .req
        .to_request(ids, st.cfg.default_max_tokens, st.client.max_seq_len(), fresh_seed())?;
    Ok(st.client.submit(req)?)
}

/// Sends the handle's events to `tx` until `Done`; gives up (dropping, hence
/// cancelling, the handle) as soon as the receiver is gone.
fn forward(mut handle: RequestHandle, tx: mpsc::UnboundedSender<Event>) {
    loop {
        if tx.is_closed() {
            return;
        }
        if let Some(ev) = handle.recv_timeout(POLL) {
            let done = matches!(ev, Event::Done(_));
            if tx.send(ev).is_err() || done {
                return;
            }
        }
    }
}

/// The shared path of both endpoints.
async fn generate(
    st: Arc<AppState>,
    body: Result<Json<GenerateRequest>, JsonRejection>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    req.check_unsupported(&st.cfg.model_id)?;
    let (prompt, add_special_tokens) = match kind {
        Kind::Completion => (req.prompt()?, true),
        Kind::Chat => {
            let msgs = req
                .messages
                .as_deref()
                .ok_or_else(|| ApiError::invalid(Some("messages".into()), "missing field `messages`"))?;
            let text = render_messages(&st.chat_format, msgs)?;
            (PromptInput::Text(text), st.chat_format == ChatTemplate::Plain)
        }
    };
    let stream = req.stream;
    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    let job = Job {
        prompt,
        add_special_tokens,
        req,
    };
    let (ready_tx, ready_rx) = oneshot::channel();
    let (tx, rx) = mpsc::unbounded_channel();
    let worker = st.clone();
    tokio::task::spawn_blocking(move || match start(&worker, &job) {
        Ok(handle) => {
            if ready_tx.send(Ok((handle.id().0, handle.prompt_tokens()))).is_ok() {
                forward(handle, tx);
            }
        }
        Err(e) => {
            let _ = ready_tx.send(Err(e));
        }
    });
    let (id, prompt_tokens) = ready_rx
        .await
        .map_err(|_| ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, "the request worker failed"))??;
    let out = Output {
        id: match kind {
            Kind::Completion => format!("cmpl-{id}"),
            Kind::Chat => format!("chatcmpl-{id}"),
        },
        created: unix_now(),
        model: st.cfg.model_id.clone(),
        kind,
        prompt_tokens,
    };
    if stream {
        Ok(sse(out, rx, include_usage).into_response())
    } else {
        whole(out, rx).await.map(IntoResponse::into_response)
    }
}

/// The fixed parts of a response.
struct Output {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: usize,
}

impl Output {
    fn usage(&self, c: &Completion) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": c.tokens.len(),
            "total_tokens": self.prompt_tokens + c.tokens.len(),
        })
    }

    /// One streamed chunk: `text` (for chat: `delta`) and the finish reason, if any.
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        let (object, choice) = match self.kind {
            Kind::Completion => (
                "text_completion",
                json!({"index": 0, "text": delta, "logprobs": null, "finish_reason": finish}),
            ),
            Kind::Chat => (
                "chat.completion.chunk",
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}),
            ),
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice]})
    }

    fn text_delta(&self, text: &str) -> Value {
        match self.kind {
            Kind::Completion => Value::String(text.to_string()),
            Kind::Chat => json!({"content": text}),
        }
    }
}

/// `stop` / `length`, or the error a request that ended otherwise becomes.
fn finish_reason(c: &Completion) -> Result<&'static str, ApiError> {
    match &c.finish_reason {
        FinishReason::Stop => Ok("stop"),
        FinishReason::Length => Ok("length"),
        FinishReason::Cancelled => Err(ApiError::server(
            StatusCode::SERVICE_UNAVAILABLE,
            "the request was cancelled: the engine is shutting down",
        )),
        FinishReason::Error(e) => Err(ApiError::server(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the request failed: {e}"),
        )),
    }
}

/// A non-streaming answer: waits for `Done`.
async fn whole(out: Output, mut rx: mpsc::UnboundedReceiver<Event>) -> Result<Json<Value>, ApiError> {
    let c = loop {
        match rx.recv().await {
            Some(Event::Done(c)) => break c,
            Some(Event::Token(_)) => {}
            None => {
                return Err(ApiError::server(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the engine stopped before the request finished",
                ))
            }
        }
    };
    let finish = finish_reason(&c)?;
    let choice = match out.kind {
        Kind::Completion => json!({"index": 0, "text": c.text, "logprobs": null, "finish_reason": finish}),
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": null,
            "finish_reason": finish,
        }),
    };
    let object = match out.kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion",
    };
    Ok(Json(json!({
        "id": out.id,
        "object": object,
        "created": out.created,
        "model": out.model,
        "choices": [choice],
        "usage": out.usage(&c),
    })))
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

/// A streaming answer: a chunk per text piece (chat starts with the assistant role),
/// a last chunk with the finish reason, the usage chunk if asked for, then `[DONE]`. A
/// request that fails midway sends an error object instead of the finish chunk.
fn sse(
    out: Output,
    rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let out = Arc::new(out);
    let first = match out.kind {
        Kind::Chat => vec![data(&out.chunk(json!({"role": "assistant", "content": ""}), None))],
        Kind::Completion => Vec::new(),
    };
    let o = out.clone();
    let events = stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        match rx.recv().await {
            Some(ev) => {
                let done = matches!(ev, Event::Done(_));
                Some((Some(ev), if done { None } else { Some(rx) }))
            }
            None => Some((None, None)),
        }
    })
    .flat_map(move |ev| {
        let mut items = Vec::new();
        match ev {
            Some(Event::Token(t)) if !t.text.is_empty() => items.push(data(&o.chunk(o.text_delta(&t.text), None))),
            Some(Event::Token(_)) => {}
            Some(Event::Done(c)) => match finish_reason(&c) {
                Ok(finish) => {
                    if !c.final_piece.is_empty() {
                        items.push(data(&o.chunk(o.text_delta(&c.final_piece), None)));
                    }
                    let empty = match o.kind {
                        Kind::Completion => Value::String(String::new()),
                        Kind::Chat => json!({}),
                    };
                    items.push(data(&o.chunk(empty, Some(finish))));
                    if include_usage {
                        let mut u = o.chunk(Value::Null, None);
                        u["choices"] = json!([]);
                        u["usage"] = o.usage(&c);
                        items.push(data(&u));
                    }
                    items.push(SseEvent::default().data("[DONE]"));
                }
                Err(e) => items.push(data(&e.body())),
            },
            None => items.push(data(
                &ApiError::server(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the engine stopped before the request finished",
                )
                .body(),
            )),
        }
        stream::iter(items.into_iter().map(Ok))
    });
    Sse::new(stream::iter(first.into_iter().map(Ok)).chain(events))
}
