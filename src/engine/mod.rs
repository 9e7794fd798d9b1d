//! The serving engine: many requests over one [`Llama`](crate::models::Llama) and one
//! `Box<dyn SparseKvCache>`, with continuous batching, chunked prefill, streamed output
//! and metrics.
//!
//! * [`Request`] — a prompt (token ids or text), `max_new_tokens`, [`SamplingParams`]
//!   (greedy, or temperature / top-k / top-p with a per-request seed), stop token ids and
//!   stop strings. [`Engine::submit`] validates it and returns a [`RequestHandle`]; a bad
//!   request (empty prompt, prompt over `max_seq_len`, `max_new_tokens` 0, negative
//!   temperature, `top_p` outside (0, 1], token ids outside the vocabulary, a request
//!   larger than the whole cache) is an [`Error::Invalid`](crate::Error::Invalid) naming
//!   the field and value, and the engine goes on serving the others.
//! * [`RequestHandle`] — streams [`Event::Token`] (id + text piece) then one
//!   [`Event::Done`] with the [`Completion`] (tokens, text, [`FinishReason`],
//!   [`Timings`]: queued time, TTFT, per-token times); [`RequestHandle::cancel`].
//! * Scheduling ([`Scheduler`]) — FIFO admission while the cache has room for prompt +
//!   `max_new_tokens` and a sequence slot is free (otherwise the request waits:
//!   back-pressure, never an error); each step carries every running decode plus
//!   prefill chunks up to [`EngineConfig::max_prefill_tokens`], as one ragged
//!   [`Llama::forward`](crate::models::Llama::forward) batch. Finished, cancelled and
//!   failed requests leave the cache at once (`remove_sequence`: pages freed in both
//!   tiers). One request's error ends only that request.
//! * Decode-only steps ([`DecodeMode`]) — on CUDA (default `Auto`) the whole model's
//!   step is padded to a fixed shape (batch 1, 2, 4, …, 512; candidate pages in
//!   multiples of 64) and replayed as a CUDA graph captured once per shape, for caches
//!   whose algorithm decodes on the device alone (dense, Quest); other steps run eagerly.
//!   A capture that fails leaves that shape eager, and the step runs again eagerly.
//! * Sampling ([`sample_batch`], and inside the captured decode step) — every row on
//!   the logits' device ([`ops::sample_rows`](crate::ops::sample_rows): greedy, or
//!   temperature / top-k / top-p as a Gumbel-max draw keyed by the request's seed and
//!   draw counter); only the sampled ids cross to the host.
//! * Metrics ([`EngineMetrics`], [`Timings`]) — prefill and decode tokens/s, waiting
//!   and running counts, cache usage and counters; per request TTFT, TPOT, ITL.
//!
//! # Threading model
//!
//! The [`Engine`] is a plain single-owner value (`Send`, not shared): every method runs
//! on the caller's thread. Two ways to drive it:
//!
//! * **Synchronous** (tests, offline benchmarks): `submit` requests, then call
//!   [`Engine::step`] (or [`Engine::run_until_idle`]) on the same thread; events are
//!   queued on each handle's channel as the steps produce them, so read the handles
//!   between or after steps — a blocking [`RequestHandle::wait`] before the engine has
//!   run would wait forever.
//! * **Threaded** (servers): [`Engine::spawn`] moves the engine onto its own thread and
//!   returns an [`EngineClient`] (Clone + Send + Sync). Any thread may `submit`:
//!   validation and tokenization run on the submitting thread, then the request goes
//!   over an `mpsc` channel; the engine thread takes everything queued before each step
//!   (new requests join the running batch at the next step), steps while there is
//!   work, and sleeps on the channel when idle. Handles are read from any thread
//!   (`recv`, `recv_timeout`, `wait`, or as an iterator); `cancel` (or dropping the
//!   handle) takes effect at the start of the engine's next step.
//!   [`EngineClient::shutdown`] cancels what is left and returns the engine.
//!
//! ```no_run
//! use spinkv::engine::{Engine, EngineConfig, Event, Request};
//! use spinkv::models::{fetch::{fetch_default_model, ModelSpec}, load_model};
//! use spinkv::partition::{Quest, QuestConfig};
//! use spinkv::SpinCache;
//! use candle_core::{DType, Device};
//!
//! # fn main() -> spinkv::Result<()> {
//! let lm = load_model(&ModelSpec::LocalPath(fetch_default_model(false)?), DType::F32, &Device::Cpu, false)?;
//! let cache = SpinCache::new(lm.model.cache_config(16_384, 0.25), Quest::new(QuestConfig::default()))?;
//! let client = Engine::from_loaded(lm, Box::new(cache), EngineConfig::default())?.spawn()?;
//! let handle = client.submit(Request::text("The capital of France is", 16))?;
//! for event in handle {
//!     match event {
//!         Event::Token(t) => print!("{}", t.text),
//!         Event::Done(c) => println!("{}\n[{}; TTFT {:?}]", c.final_piece, c.finish_reason, c.timings.ttft()),
//!     }
//! }
//! let engine = client.shutdown()?;
//! println!("{:?}", engine.metrics());
//! # Ok(()) }
//! ```

mod batch;
mod client;
mod decode;
#[allow(clippy::module_inception)]
mod engine;
mod handle;
mod metrics;
mod request;
mod sampler;
mod scheduler;
mod text;

pub use client::EngineClient;
pub use decode::{DecodeCounters, DecodeMode};
pub use engine::{Engine, EngineConfig, StepReport};
pub use handle::{Canceller, Completion, Event, FinishReason, RequestHandle, TokenEvent};
pub use metrics::{device_memory_used, percentile, EngineMetrics, LatencySummary, Timings, P50P99};
pub use request::{Prompt, Request, RequestId, SamplingParams};
pub use sampler::{sample_batch, RequestSampler};
pub use scheduler::{Scheduled, Scheduler, SchedulerConfig, StepPlan, Work};
