//! [`Engine`]: owns a [`Llama`], a `Box<dyn SparseKvCache>` and an optional tokenizer,
//! and runs the scheduler's steps through [`Llama::forward`] (one ragged batch per
//! step), sampling, streaming and per-request bookkeeping. Used directly it is the
//! synchronous, single-thread API; [`Engine::spawn`] moves it onto its own thread.

use super::client::{self, EngineClient};
use super::decode::{DecodeMode, DecodeRunner};
use super::handle::{channel, Completion, Event, FinishReason, Reply, RequestHandle, TokenEvent};
use super::metrics::{EngineMetrics, Timings};
use super::request::{Limits, Prepared, Request, RequestId};
use super::sampler::RequestSampler;
use super::scheduler::{Scheduler, SchedulerConfig};
use super::text::TextStream;
use crate::models::tokenizer::TokenizerInfo;
use crate::models::{Llama, LoadedModel};
use crate::{Error, Result, SeqId, SparseKvCache};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenizers::Tokenizer;

/// Settings of an [`Engine`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Most requests running at once (default 64); also capped by the cache's free
    /// sequence slots (`CacheConfig::max_sequences`).
    pub max_running: usize,
    /// Prompt tokens per step over all prefill chunks (default 512): the longest a
    /// prefill stalls the running decodes is one step of this many tokens.
    pub max_prefill_tokens: usize,
    /// Token ids that end every request unless it sets `ignore_eos` (the model's EOS
    /// and end-of-turn tokens; [`Engine::from_loaded`] fills them in).
    pub eos_token_ids: Vec<u32>,
    /// How decode-only steps run (default [`DecodeMode::Auto`]: CUDA graphs where the
    /// device and the cache allow them).
    pub decode_mode: DecodeMode,
    /// Give each admitted request its pages for prompt + `max_new_tokens` at once
    /// ([`SparseKvCache::reserve`]; default on). Admission already counts those pages, so
    /// this holds no more than the scheduler promised; it moves the page allocation and
    /// page-table writes of decode steps (a step where a whole batch starts pages
    /// together is the costliest on the host) to admission. A cache that refuses (full)
    /// allocates on demand instead.
    pub reserve_pages: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_running: 64,
            max_prefill_tokens: 512,
            eos_token_ids: Vec::new(),
            decode_mode: DecodeMode::Auto,
            reserve_pages: true,
        }
    }
}

/// What one [`Engine::step`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepReport {
    /// Requests admitted (given a cache sequence) by this step.
    pub admitted: usize,
    /// Prompt tokens fed.
    pub prefill_tokens: usize,
    /// Decodes in the batch (one token each).
    pub decodes: usize,
    /// Output tokens sampled (decodes plus prompts that ended in this step).
    pub sampled: usize,
    /// Requests that ended in this step (any reason).
    pub finished: usize,
    /// Wall time of the step.
    pub elapsed: Duration,
}

/// A request the engine holds, from submission to completion.
pub(super) struct Active {
    pub(super) id: RequestId,
    pub(super) reply: Reply,
    pub(super) req: Prepared,
    pub(super) sampler: RequestSampler,
    pub(super) seq: Option<SeqId>,
    pub(super) tokens: Vec<u32>,
    text: TextStream,
    submitted: Instant,
    queued: Option<Duration>,
    token_times: Vec<Duration>,
}

/// `SPINKV_STEP_LOG=1`: each step waits for the device at its end and prints its token
/// counts and wall time to stderr, for finding where a long prefill's time goes (the
/// wait keeps the host from running ahead, so steps run serialized).
fn step_log() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SPINKV_STEP_LOG").is_ok_and(|v| v == "1"))
}

/// The serving engine: continuous batching with chunked prefill over a sparse KV cache.
/// See the [module docs](super) for the threading model.
pub struct Engine {
    pub(super) model: Llama,
    pub(super) cache: Box<dyn SparseKvCache>,
    info: Option<TokenizerInfo>,
    limits: Limits,
    cfg: EngineConfig,
    sched: Scheduler,
    /// In submission order.
    pub(super) active: Vec<Active>,
    next_id: Arc<AtomicU64>,
    metrics: EngineMetrics,
    pub(super) decoder: DecodeRunner,
    /// The last error of the padded decode path (the step then ran eagerly).
    pub(super) last_decode_error: Option<String>,
}

impl Engine {
    /// An engine over `model` and an empty or partly used `cache` (the pages already
    /// used stay out of its reach), with an optional `tokenizer` (needed for text
    /// prompts, text output and stop strings).
    ///
    /// Fails with [`Error::Config`] when the cache's shape (layers, heads, head_dim),
    /// dtype or device differ from the model's, or a limit is 0.
    pub fn new(
        model: Llama,
        cache: Box<dyn SparseKvCache>,
        tokenizer: Option<Tokenizer>,
        cfg: EngineConfig,
    ) -> Result<Self> {
        let (m, c) = (model.config(), cache.config());
        if (m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim)
            != (c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim)
        {
            return Err(Error::Config(format!(
                "Engine::new: the model has (layers, Hq, Hkv, D) = ({}, {}, {}, {}) but the cache ({}, {}, {}, {})",
                m.num_layers,
                m.num_heads,
                m.num_kv_heads,
                m.head_dim,
                c.num_layers,
                c.num_q_heads,
                c.num_kv_heads,
                c.head_dim
            )));
        }
        if model.dtype() != c.dtype || !model.device().same_device(&c.device) {
            return Err(Error::Config(format!(
                "Engine::new: the model is {:?} on {:?} but the cache is {:?} on {:?}",
                model.dtype(),
                model.device(),
                c.dtype,
                c.device
            )));
        }
        let usage = cache.pool_usage();
        // Pages of either home (host tier or fast homes) that are free.
        let capacity_pages =
            (usage.host_capacity + usage.fast_home_capacity).saturating_sub(usage.host_used + usage.fast_home_used);
        let limits = Limits {
            tokenizer: tokenizer.map(Arc::new),
            vocab_size: m.vocab_size,
            max_seq_len: c.max_seq_len,
            page_size: c.page_size,
            pages_per_block: c.num_layers * c.num_kv_heads,
            capacity_pages,
            eos: cfg.eos_token_ids.clone(),
        };
        let sched = Scheduler::new(SchedulerConfig {
            max_running: cfg.max_running.min(c.max_sequences),
            max_prefill_tokens: cfg.max_prefill_tokens,
            capacity_pages: capacity_pages.max(1),
        })?;
        let decoder = DecodeRunner::new(cfg.decode_mode, &model)?;
        // The kernels' one-time JIT compilation, here rather than in the first steps.
        crate::ops::preload_kernels(model.device())?;
        Ok(Self {
            decoder,
            last_decode_error: None,
            model,
            cache,
            info: None,
            limits,
            cfg,
            sched,
            active: Vec::new(),
            next_id: Arc::new(AtomicU64::new(0)),
            metrics: EngineMetrics::default(),
        })
    }

    /// An engine over a loaded model: its tokenizer and tokenizer info (EOS and
    /// end-of-turn tokens become `cfg.eos_token_ids` when that is empty; the chat
    /// template is kept for [`tokenizer_info`](Self::tokenizer_info)).
    pub fn from_loaded(lm: LoadedModel, cache: Box<dyn SparseKvCache>, mut cfg: EngineConfig) -> Result<Self> {
        if cfg.eos_token_ids.is_empty() {
            cfg.eos_token_ids = lm.info.eos.clone();
        }
        let mut e = Self::new(lm.model, cache, Some(lm.tokenizer), cfg)?;
        e.info = Some(lm.info);
        Ok(e)
    }

    /// Validates `req`, encodes a text prompt, and queues it (FIFO). Returns the handle
    /// that streams its tokens. A bad request is rejected here with
    /// [`Error::Invalid`] naming the field and value, and nothing is queued; a request
    /// that must wait for room is not an error.
    pub fn submit(&mut self, req: Request) -> Result<RequestHandle> {
        let prepared = self.limits.prepare(req)?;
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (handle, reply) = channel(id, prepared.prompt.len());
        self.enqueue(id, prepared, reply, Instant::now())?;
        Ok(handle)
    }

    /// Queues a prepared request (also used by the engine thread for client submits); on
    /// failure the handle receives a completion with the error too.
    pub(crate) fn enqueue(&mut self, id: RequestId, req: Prepared, reply: Reply, submitted: Instant) -> Result<()> {
        if let Err(e) = self.sched.enqueue(id, req.prompt.len(), req.pages) {
            reply.fail(id, req.prompt.len(), e.to_string());
            return Err(e);
        }
        self.metrics.submitted += 1;
        self.active.push(Active {
            id,
            reply,
            sampler: RequestSampler::new(req.sampling),
            text: TextStream::new(req.stop_strings.clone()),
            req,
            seq: None,
            tokens: Vec::new(),
            submitted,
            queued: None,
            token_times: Vec::new(),
        });
        Ok(())
    }

    /// Whether requests wait or run.
    pub fn has_work(&self) -> bool {
        !self.active.is_empty()
    }

    /// Runs steps until every request has finished.
    pub fn run_until_idle(&mut self) -> Result<()> {
        while self.has_work() {
            self.step()?;
        }
        Ok(())
    }

    /// Runs one step: drops cancelled requests, admits waiting ones (FIFO, while pages
    /// and sequence slots allow), runs every decode plus prefill chunks up to
    /// `max_prefill_tokens` as one [`Llama::forward`] batch (a batch of decodes only:
    /// through the padded decode path, replayed as a CUDA graph where
    /// [`EngineConfig::decode_mode`] allows), samples the batch, and streams the new tokens. A request that fails ends with [`FinishReason::Error`]
    /// and the others go on; `Err` is returned only when the cache itself can no longer
    /// be trusted (a sequence could not be removed).
    pub fn step(&mut self) -> Result<StepReport> {
        let _span = crate::host_timing::span("engine.step");
        let t0 = Instant::now();
        let mut report = StepReport::default();
        let cancelled: Vec<RequestId> = self
            .active
            .iter()
            .filter(|a| a.reply.cancelled())
            .map(|a| a.id)
            .collect();
        for id in cancelled {
            self.finish(id, FinishReason::Cancelled, &mut report)?;
        }
        let plan = self.sched.schedule();
        for &id in &plan.admitted {
            let seq = self.cache.add_sequence();
            let Some(a) = self.active.iter_mut().find(|a| a.id == id) else {
                continue;
            };
            a.queued = Some(a.submitted.elapsed());
            match seq {
                Ok(seq) => {
                    a.seq = Some(seq);
                    report.admitted += 1;
                    if self.cfg.reserve_pages {
                        let tokens = (a.req.prompt.len() + a.req.max_new_tokens).min(self.limits.max_seq_len);
                        match self.cache.reserve(seq, tokens) {
                            // Full: the pages come on demand, as without reserving.
                            Ok(()) | Err(Error::PoolExhausted { .. }) => {}
                            Err(e) => self.finish(id, FinishReason::Error(format!("reserve: {e}")), &mut report)?,
                        }
                    }
                }
                Err(e) => self.finish(id, FinishReason::Error(format!("add_sequence: {e}")), &mut report)?,
            }
        }
        if !plan.is_empty() {
            self.run_plan(&plan, &mut report)?;
        }
        if step_log() {
            self.model.device().synchronize()?;
            eprintln!(
                "step {}: {} prefill tokens, {} decodes, {:.3} ms (device synchronized)",
                self.metrics.steps,
                report.prefill_tokens,
                report.decodes,
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
        report.elapsed = t0.elapsed();
        let secs = report.elapsed.as_secs_f64();
        if report.prefill_tokens > 0 || report.decodes > 0 {
            self.metrics.steps += 1;
            self.metrics.busy_secs += secs;
            if report.prefill_tokens > 0 {
                self.metrics.prefill_secs += secs;
            } else {
                self.metrics.decode_only_secs += secs;
                self.metrics.decode_only_tokens += report.sampled as u64;
            }
        }
        self.metrics.prefill_tokens += report.prefill_tokens as u64;
        self.metrics.decode_tokens += report.sampled as u64;
        Ok(report)
    }

    /// Records a sampled token: stop token, stop string, length, or stream it.
    pub(super) fn on_token(&mut self, id: RequestId, tok: u32, report: &mut StepReport) -> Result<()> {
        let tokenizer = self.limits.tokenizer.clone();
        let Some(a) = self.active.iter_mut().find(|a| a.id == id) else {
            return Ok(());
        };
        let end = if a.req.stop_ids.contains(&tok) {
            Some(FinishReason::Stop)
        } else {
            a.tokens.push(tok);
            a.token_times.push(a.submitted.elapsed());
            match a.text.push(tokenizer.as_deref(), tok) {
                Err(e) => Some(FinishReason::Error(e.to_string())),
                Ok((piece, stopped)) => {
                    let delivered = a.reply.send(Event::Token(TokenEvent {
                        token: tok,
                        index: a.tokens.len() - 1,
                        text: piece,
                    }));
                    if !delivered {
                        Some(FinishReason::Cancelled)
                    } else if stopped {
                        Some(FinishReason::Stop)
                    } else if a.tokens.len() >= a.req.max_new_tokens {
                        Some(FinishReason::Length)
                    } else {
                        None
                    }
                }
            }
        };
        match end {
            Some(reason) => self.finish(id, reason, report),
            None => Ok(()),
        }
    }

    /// Ends a request: leaves the scheduler and the cache (pages freed in both tiers)
    /// and sends its completion.
    pub(super) fn finish(&mut self, id: RequestId, reason: FinishReason, report: &mut StepReport) -> Result<()> {
        let Some(i) = self.active.iter().position(|a| a.id == id) else {
            return Ok(());
        };
        let mut a = self.active.remove(i);
        self.sched.remove(id);
        report.finished += 1;
        let removed = match a.seq {
            Some(seq) => self.cache.remove_sequence(seq),
            None => Ok(()),
        };
        let tokenizer = self.limits.tokenizer.clone();
        let (reason, final_piece) = match (a.text.finish(tokenizer.as_deref()), reason) {
            (Ok(piece), r) => (r, piece),
            (Err(e), FinishReason::Stop | FinishReason::Length) => (FinishReason::Error(e.to_string()), String::new()),
            (Err(_), r) => (r, String::new()),
        };
        match &reason {
            FinishReason::Stop | FinishReason::Length => self.metrics.completed += 1,
            FinishReason::Cancelled => self.metrics.cancelled += 1,
            FinishReason::Error(_) => self.metrics.errored += 1,
        }
        let total = a.submitted.elapsed();
        a.reply.send(Event::Done(Completion {
            id,
            prompt_tokens: a.req.prompt.len(),
            text: a.text.text().to_string(),
            final_piece,
            tokens: std::mem::take(&mut a.tokens),
            finish_reason: reason,
            timings: Timings {
                queued: a.queued.unwrap_or(total),
                token_times: std::mem::take(&mut a.token_times),
                total,
            },
        }));
        removed
    }

    /// Ends every request with [`FinishReason::Cancelled`] (used at shutdown).
    pub fn cancel_all(&mut self) -> Result<()> {
        let ids: Vec<RequestId> = self.active.iter().map(|a| a.id).collect();
        let mut report = StepReport::default();
        for id in ids {
            self.finish(id, FinishReason::Cancelled, &mut report)?;
        }
        Ok(())
    }

    /// A snapshot of the engine's counters, queue lengths and cache statistics.
    pub fn metrics(&self) -> EngineMetrics {
        EngineMetrics {
            waiting: self.sched.waiting(),
            running: self.sched.running(),
            cache_usage: self.cache.pool_usage(),
            cache_stats: self.cache.stats(),
            decode: self.decoder.counters,
            ..self.metrics
        }
    }

    /// Ids of the requests waiting for admission, in FIFO order.
    pub fn waiting_ids(&self) -> Vec<RequestId> {
        self.sched.waiting_ids()
    }

    /// Ids of the running requests, in admission order.
    pub fn running_ids(&self) -> Vec<RequestId> {
        self.sched.running_ids()
    }

    /// The cache (for its statistics and pool usage).
    pub fn cache(&self) -> &dyn SparseKvCache {
        self.cache.as_ref()
    }

    /// Starts (`true`) or stops recording the cache's decode selections
    /// ([`SparseKvCache::record_selections`]): every (step, layer, sequence, KV head)'s
    /// selected pages, for trace-driven cache studies (`examples/cache_sim`). Decode
    /// steps run eagerly while recording.
    pub fn record_selections(&mut self, on: bool) -> Result<()> {
        self.cache.record_selections(on)
    }

    /// The selections recorded since the last call.
    pub fn take_selections(&mut self) -> Vec<crate::SelectionRecord> {
        self.cache.take_selections()
    }

    /// The model.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The tokenizer, if any.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.limits.tokenizer.as_deref()
    }

    /// Special tokens and chat template (engines built with [`from_loaded`](Self::from_loaded)).
    pub fn tokenizer_info(&self) -> Option<&TokenizerInfo> {
        self.info.as_ref()
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Longest prompt + `max_new_tokens` accepted (the cache's `max_seq_len`).
    pub fn max_seq_len(&self) -> usize {
        self.limits.max_seq_len
    }

    /// Moves the engine onto its own thread, which runs steps while there is work and
    /// sleeps on its command channel otherwise. Returns a client (Clone + Send + Sync)
    /// to submit from any thread; [`EngineClient::shutdown`] gives the engine back.
    pub fn spawn(self) -> Result<EngineClient> {
        client::spawn(self)
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    pub(crate) fn id_counter(&self) -> Arc<AtomicU64> {
        self.next_id.clone()
    }
}
