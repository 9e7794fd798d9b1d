//! The OpenAI-compatible server end to end (CPU, SmolLM2-135M-Instruct fetched on first
//! run): a completion and a streaming chat request answer "Paris", a malformed body gets
//! a 400 with an error message, and the server keeps serving. Every request has a
//! timeout; the server's runtime is dropped at the end.

use candle_core::{DType, Device};
use spinkv::engine::{Engine, EngineConfig};
use spinkv::models::fetch::{fetch_default_model, ModelSpec};
use spinkv::models::load_model;
use spinkv::partition::{Quest, QuestConfig};
use spinkv::server::{serve_on, ServerConfig};
use spinkv::SpinCache;
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

const MODEL: &str = "smollm2";

/// Starts the server on 127.0.0.1:0; returns its runtime (drop it to stop) and base URL.
fn start() -> (tokio::runtime::Runtime, String) {
    let path = fetch_default_model(false).expect("fetch SmolLM2");
    let lm = load_model(&ModelSpec::LocalPath(path), DType::F32, &Device::Cpu, false).expect("load SmolLM2");
    let cache = SpinCache::new(
        lm.model.cache_config(4096, 1.0),
        Quest::new(QuestConfig {
            budget_tokens: 1024,
            ..Default::default()
        }),
    )
    .expect("cache");
    let client = Engine::from_loaded(lm, Box::new(cache), EngineConfig::default())
        .expect("engine")
        .spawn()
        .expect("spawn");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let cfg = ServerConfig {
        max_prompt_tokens: Some(512),
        ..ServerConfig::new(MODEL)
    };
    rt.spawn(serve_on(listener, client, cfg));
    (rt, format!("http://{addr}"))
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build()
}

/// GETs `url`, expecting 200 and JSON.
fn get(agent: &ureq::Agent, url: &str) -> serde_json::Value {
    let text = agent.get(url).call().expect("GET").into_string().expect("body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url} answered non-JSON {text:?}: {e}"))
}

/// POSTs `body` as JSON; returns (status, body) for success and error statuses alike.
fn post(agent: &ureq::Agent, url: &str, body: &str) -> (u16, serde_json::Value) {
    let resp = match agent
        .post(url)
        .set("Content-Type", "application/json")
        .send_string(body)
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("POST {url}: {e}"),
    };
    let status = resp.status();
    let text = resp.into_string().expect("body");
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url} answered non-JSON {text:?}: {e}"));
    (status, json)
}

#[test]
fn completion_streaming_chat_and_bad_bodies() {
    let (rt, base) = start();
    let agent = agent();
    let t0 = Instant::now();

    // Health and the model list.
    let health = get(&agent, &format!("{base}/health"));
    assert_eq!(health["status"], "ok", "{health}");
    let models = get(&agent, &format!("{base}/v1/models"));
    assert_eq!(models["data"][0]["id"], MODEL, "{models}");

    // A non-streaming completion, greedy.
    let (status, c) = post(
        &agent,
        &format!("{base}/v1/completions"),
        r#"{"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}"#,
    );
    assert_eq!(status, 200, "{c}");
    let text = c["choices"][0]["text"].as_str().expect("text");
    assert!(text.contains("Paris"), "completion {text:?}");
    assert_eq!(c["object"], "text_completion");
    let n = c["usage"]["completion_tokens"].as_u64().expect("usage");
    assert!((1..=4).contains(&n), "{c}");
    assert!(c["usage"]["prompt_tokens"].as_u64().unwrap() > 3, "{c}");
    let finish = c["choices"][0]["finish_reason"].as_str().expect("finish_reason");
    assert!(finish == "length" || (finish == "stop" && n < 4), "{c}");

    // A malformed body, a field of the wrong type, a bad value: 400 with a message.
    let url = format!("{base}/v1/completions");
    for (body, needle) in [
        (r#"{"prompt": "x", "max_tokens": "#, "EOF"),
        (r#"{"prompt": "x", "max_tokens": "four"}"#, "max_tokens"),
        (r#"{"prompt": "x", "top_p": 1.5}"#, "top_p"),
    ] {
        let (status, e) = post(&agent, &url, body);
        assert_eq!(status, 400, "{body} -> {e}");
        let msg = e["error"]["message"].as_str().expect("error message");
        assert!(msg.contains(needle), "{body} -> {msg:?}");
    }
    let long = format!(r#"{{"prompt": "{}"}}"#, "word ".repeat(2000));
    let (status, e) = post(&agent, &url, &long);
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["code"], "context_length_exceeded", "{e}");

    // A streaming chat request, greedy, after the errors: the server still serves.
    let resp = agent
        .post(&format!("{base}/v1/chat/completions"))
        .set("Content-Type", "application/json")
        .send_string(
            r#"{"messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 12, "temperature": 0, "stream": true}"#,
        )
        .expect("chat request");
    assert_eq!(resp.status(), 200);
    assert!(
        resp.content_type().starts_with("text/event-stream"),
        "{}",
        resp.content_type()
    );
    let (mut answer, mut done, mut finish) = (String::new(), false, None);
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.expect("read the stream");
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let chunk: serde_json::Value = serde_json::from_str(data).expect("chunk JSON");
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
        let choice = &chunk["choices"][0];
        if let Some(piece) = choice["delta"]["content"].as_str() {
            answer.push_str(piece);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert!(done, "the stream ends with [DONE]");
    assert!(matches!(finish.as_deref(), Some("stop" | "length")), "{finish:?}");
    assert!(answer.contains("Paris"), "chat answered {answer:?}");

    let health = get(&agent, &format!("{base}/health"));
    assert_eq!(health["status"], "ok", "{health}");
    assert!(t0.elapsed() < Duration::from_secs(300), "took {:?}", t0.elapsed());
    rt.shutdown_timeout(Duration::from_secs(5));
}
