//! End-to-end benchmark of the serving engine ([`spinkv::engine`]): offline batches,
//! online Poisson load, and passkey accuracy next to throughput from the same run.
//!
//! CPU smoke checks (small sizes):
//!
//! ```text
//! cargo run --release --example serve_bench -- offline --shape smollm2-135m --random-weights --context 64 --new-tokens 4 --batch 1,2
//! cargo run --release --example serve_bench -- online --shape smollm2-135m --random-weights --requests 4 --rate 4 --prompt-range 16:64 --new-tokens 4
//! cargo run --release --example serve_bench -- accuracy --model default --context 256 --trials 1 --depths 0.5 --algo dense,quest
//! ```
//!
//! On a GPU: `cargo run --release --features cuda --example serve_bench -- offline --cuda
//! --shape llama3-8b --random-weights --context 32768 --new-tokens 64 --batch 8,16
//! --algo dense,quest --budget 2048 --csv bench.csv --plot-dir docs/plots`.
//!
//! How things are measured:
//! * decode tokens/s: tokens sampled in decode-only steps over the wall time of those
//!   steps ([`EngineMetrics::decode_tps`]); steps carrying any prefill chunk are left out.
//!   "full-batch decode tok/s" (offline) keeps only the decode-only steps that carried
//!   every request of the run: the steady state at batch B, as the PyTorch anchor
//!   measures it (the tail, where requests finish one by one, and the first step of each
//!   padded shape, which warms up and captures its CUDA graph, are left out only when
//!   they run with fewer requests). "steady decode tok/s" (offline) also leaves out the
//!   full-batch steps that warmed up or captured a CUDA graph (short runs at long
//!   contexts have few steps, and a capture there costs as much as many of them), and
//!   those that fell back to the ragged eager path (ShadowKV: a sequence's first decode
//!   step, which compresses its prefill); the run prints how many there were and their
//!   time.
//!   "output tok/s" counts every output token over all busy time.
//! * TTFT, TPOT, ITL: per request from its submission ([`spinkv::engine::Timings`]); in
//!   offline mode all B requests are submitted at once, so TTFT includes the wait behind
//!   the other prompts' prefill.
//! * memory: on CUDA, the most device memory in use (total − free, whole device) seen
//!   after any step (online: after each completion); elsewhere the cache's configured
//!   bytes (both tiers).
//! * random weights: prompts are random token ids and EOS is ignored, so every request
//!   generates exactly `--new-tokens`.

#[path = "common/device.rs"]
mod device;
#[path = "common/plot.rs"]
mod plot;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::DType;
use clap::builder::PossibleValuesParser;
use clap::{Parser, Subcommand};
use plot::plot;
use rand::{rngs::StdRng, Rng, SeedableRng};
use spinkv::engine::{
    device_memory_used, Completion, DecodeMode, Engine, EngineConfig, EngineMetrics, FinishReason, LatencySummary,
    Prompt, Request,
};
use spinkv::models::fetch::ModelSpec;
use spinkv::models::passkey::{build_prompt, is_correct, KeyGen};
use spinkv::models::random::{random_llama, shape_config, SHAPES};
use spinkv::models::{load_model, Llama};
use spinkv::partition::{by_name, ALGORITHMS, VARIANTS};
use spinkv::{FetchMode, PageLayout, SpinCache};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokenizers::Tokenizer;

#[derive(Parser, Debug)]
#[command(about = "End-to-end benchmark of spinkv's serving engine")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
    /// `default` (SmolLM2-135M-Instruct), a GGUF file or HF folder, or a Hub id.
    #[arg(long, global = true)]
    model: Option<String>,
    /// A named shape with random weights (needs --random-weights).
    #[arg(long, global = true, value_parser = PossibleValuesParser::new(SHAPES))]
    shape: Option<String>,
    /// Random weights at --shape (prompts are random token ids; no tokenizer).
    #[arg(long, global = true)]
    random_weights: bool,
    /// Weight/KV dtype (default: bf16 for random weights on CUDA, f16 for a real model
    /// on CUDA, f32 on the CPU).
    #[arg(long, global = true, value_parser = ["f32", "f16", "bf16"])]
    dtype: Option<String>,
    /// Run on the GPU (needs a build with `--features cuda`).
    #[arg(long, global = true)]
    cuda: bool,
    /// Algorithms to compare (comma-separated).
    #[arg(long, global = true, value_delimiter = ',', default_value = "dense",
          value_parser = PossibleValuesParser::new(ALGORITHMS.iter().chain(VARIANTS)))]
    algo: Vec<String>,
    /// Token budget of the sparse algorithms per decode step and KV head.
    #[arg(long, global = true, default_value_t = 2048, value_parser = at_least_1)]
    budget: usize,
    /// Fraction of the KV that fits the fast tier, in [0, 1] (1: every page has its own
    /// fast slot, direct-mapped, no replacement).
    #[arg(long, global = true, default_value_t = 1.0, value_parser = fraction)]
    fast_fraction: f64,
    /// Fraction of the KV pages whose home is the fast tier (HBM), in [0, 1): the rest
    /// live in pinned host memory, cached by a fast tier of --fast-fraction of them.
    /// The capacity is then HBM plus host.
    #[arg(long, global = true, default_value_t = 0.0, value_parser = fraction)]
    fast_home_fraction: f64,
    /// How a tiered step reads the pages its fast tier misses (`CacheConfig::fetch_mode`):
    /// in-kernel (the default: inside the attention launch), side-stream (copied on a
    /// second stream while resident pages are attended; `--cuda` only) or in-order.
    #[arg(long, global = true, value_enum, default_value_t = Fetch::InKernel)]
    fetch: Fetch,
    /// Tokens per KV page (default: the algorithm's own, else 16).
    #[arg(long, global = true)]
    page_size: Option<usize>,
    /// Where a new page's slots go (`CacheConfig::page_layout`): interleaved (a page's
    /// layers and KV heads side by side) or by-directory (each (layer, KV head)'s pages
    /// side by side).
    #[arg(long, global = true, value_enum, default_value_t = Layout::Interleaved)]
    page_layout: Layout,
    /// Prompt tokens per engine step (the chunked-prefill budget).
    #[arg(long, global = true, default_value_t = 512, value_parser = at_least_1)]
    max_prefill_tokens: usize,
    /// Seed of the weights, prompts, arrivals and keys.
    #[arg(long, global = true, default_value_t = 1234)]
    seed: u64,
    /// Write one CSV row per configuration here.
    #[arg(long, global = true)]
    csv: Option<PathBuf>,
    /// Write SVG plots (throughput against batch, TTFT distribution) into this folder.
    #[arg(long, global = true)]
    plot_dir: Option<PathBuf>,
    /// Record every decode selection (step, layer, request, KV head, pages) of each run
    /// and write it here as `MODE_ALGO_CONTEXT_bBATCH.csv`, the trace format
    /// `cache_sim --traces` replays. Decode steps then run eagerly.
    #[arg(long, global = true)]
    trace_dir: Option<PathBuf>,
    /// Keep decoding past end-of-sequence tokens, to --new-tokens (e.g. for longer
    /// selection traces of a real model).
    #[arg(long, global = true)]
    ignore_eos: bool,
    /// How decode-only steps run: `auto` (CUDA graphs on CUDA, else eager), `eager`,
    /// `padded` (the graphs' padded work, run eagerly) or `graphs`.
    #[arg(long, global = true, default_value = "auto", value_parser = ["auto", "eager", "padded", "graphs"])]
    decode: String,
    /// Shorthand for `--decode eager` (no CUDA graphs), for comparison.
    #[arg(long, global = true)]
    no_graphs: bool,
    /// The prefill attention kernel on CUDA: `auto` (wgmma on a compute capability 9.0
    /// device for head dims 64/128, else mma.sync) or `mma` (mma.sync always), for
    /// comparison (`spinkv::ops::set_prefill_wgmma`).
    #[arg(long, global = true, default_value = "auto", value_parser = ["auto", "mma"])]
    prefill_kernel: String,
    /// Profile this many decode-only steps, after the first four (past warm-up and
    /// capture): the CUDA profiler's collection is on only around them, for
    /// `ncu --profile-from-start off`. The run prints how many requests each profiled
    /// step carried (a step profiled while others prefill carries fewer). 0: off.
    #[arg(long, global = true, default_value_t = 0)]
    profile_steps: usize,
    /// Print the host time of the engine's steps broken down by part
    /// (`spinkv::host_timing`), after each configuration.
    #[arg(long, global = true)]
    host_timing: bool,
}

/// Decode-only steps run before `--profile-steps` starts collecting.
const PROFILE_AFTER: usize = 4;

fn decode_mode(c: &Cli) -> DecodeMode {
    match (c.no_graphs, c.decode.as_str()) {
        (true, _) | (_, "eager") => DecodeMode::Eager,
        (_, "padded") => DecodeMode::Padded,
        (_, "graphs") => DecodeMode::Graphs,
        _ => DecodeMode::Auto,
    }
}

/// `--page-layout` (`spinkv::PageLayout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Layout {
    Interleaved,
    ByDirectory,
}

/// `--fetch`: a tiered step's miss path (`spinkv::FetchMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Fetch {
    InKernel,
    SideStream,
    InOrder,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// B requests of L prompt tokens and N new tokens each, all submitted at once.
    Offline(OfflineArgs),
    /// R requests with Poisson arrivals, the engine on its own thread.
    Online(OnlineArgs),
    /// Passkey retrieval at several depths (real model), one batch per algorithm.
    Accuracy(AccuracyArgs),
}

#[derive(clap::Args, Debug)]
struct OfflineArgs {
    /// Batch sizes B to run, each with a fresh engine.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64", value_parser = at_least_1)]
    batch: Vec<usize>,
    /// Prompt tokens L per request.
    #[arg(long, default_value_t = 1024, value_parser = at_least_1)]
    context: usize,
    /// New tokens N per request.
    #[arg(long, default_value_t = 64, value_parser = at_least_1)]
    new_tokens: usize,
    /// Then grow B (doubling, then bisecting) until the cache or the device fails.
    #[arg(long)]
    find_max_batch: bool,
    /// Largest B --find-max-batch tries (on the CPU a failed host allocation aborts).
    #[arg(long, default_value_t = 1024, value_parser = at_least_1)]
    max_batch_limit: usize,
}

#[derive(clap::Args, Debug)]
struct OnlineArgs {
    /// Requests R.
    #[arg(long, default_value_t = 32, value_parser = at_least_1)]
    requests: usize,
    /// Mean arrival rate, requests/s (Poisson process, seeded).
    #[arg(long, default_value_t = 1.0, value_parser = positive)]
    rate: f64,
    /// Prompt lengths, uniform in MIN:MAX tokens.
    #[arg(long, default_value = "128:1024", value_parser = parse_range)]
    prompt_range: (usize, usize),
    /// New tokens per request.
    #[arg(long, default_value_t = 64, value_parser = at_least_1)]
    new_tokens: usize,
    /// Most requests running at once (sizes the cache).
    #[arg(long, default_value_t = 16, value_parser = at_least_1)]
    max_running: usize,
}

#[derive(clap::Args, Debug)]
struct AccuracyArgs {
    /// Prompt length in tokens (approximate).
    #[arg(long, default_value_t = 1024, value_parser = at_least_1)]
    context: usize,
    /// Depths of the key, fractions of the haystack in [0, 1].
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.5,0.9", value_parser = fraction)]
    depths: Vec<f64>,
    /// Trials per depth, each with a fresh key.
    #[arg(long, default_value_t = 2, value_parser = at_least_1)]
    trials: usize,
    /// Answer tokens (greedy, stops at EOS).
    #[arg(long, default_value_t = 8, value_parser = at_least_1)]
    new_tokens: usize,
}

fn at_least_1(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be >= 1".into()),
        r => r.map_err(|e| e.to_string()),
    }
}

fn fraction(s: &str) -> std::result::Result<f64, String> {
    let x: f64 = s.trim().parse().map_err(|e| format!("{e}"))?;
    (0.0..=1.0)
        .contains(&x)
        .then_some(x)
        .ok_or(format!("{x} is not in [0, 1]"))
}

fn positive(s: &str) -> std::result::Result<f64, String> {
    let x: f64 = s.trim().parse().map_err(|e| format!("{e}"))?;
    (x.is_finite() && x > 0.0)
        .then_some(x)
        .ok_or(format!("{x} is not a positive number"))
}

fn parse_range(s: &str) -> std::result::Result<(usize, usize), String> {
    let (a, b) = s.split_once(':').ok_or("expected MIN:MAX, e.g. 128:1024")?;
    let (a, b) = (at_least_1(a)?, at_least_1(b)?);
    (a <= b).then_some((a, b)).ok_or(format!("MIN ({a}) > MAX ({b})"))
}

/// The model under test.
struct Bench {
    model: Llama,
    tokenizer: Option<Tokenizer>,
    eos: Vec<u32>,
    name: String,
}

fn load(c: &Cli) -> Result<Bench> {
    let device = device::device(c.cuda)?;
    let dtype = match c.dtype.as_deref() {
        Some("f16") => DType::F16,
        Some("bf16") => DType::BF16,
        Some(_) => DType::F32,
        None if c.cuda && c.random_weights => DType::BF16,
        None if c.cuda => DType::F16,
        None => DType::F32,
    };
    if c.random_weights {
        ensure!(
            c.model.is_none(),
            "--random-weights builds the model from --shape: drop --model"
        );
        let name = c
            .shape
            .as_deref()
            .context("--random-weights needs --shape (llama3-8b, qwen2-7b, smollm2-135m)")?;
        let cfg = shape_config(name).with_context(|| format!("--shape: unknown shape {name}"))?;
        eprintln!(
            "building random {name} weights ({dtype:?} on {:?})...",
            device.location()
        );
        let model = random_llama(cfg, dtype, &device, c.seed)?;
        Ok(Bench {
            model,
            tokenizer: None,
            eos: Vec::new(),
            name: format!("{name} (random {dtype:?})"),
        })
    } else {
        ensure!(
            c.shape.is_none(),
            "--shape needs --random-weights (a real model comes from --model)"
        );
        let spec = ModelSpec::parse(c.model.as_deref().unwrap_or("default"))?;
        let lm = load_model(&spec, dtype, &device, true)?;
        Ok(Bench {
            model: lm.model,
            tokenizer: Some(lm.tokenizer),
            eos: lm.info.eos,
            name: lm.source,
        })
    }
}

/// The fast tier's page requests over the whole run (prefill and decode steps): hits,
/// misses (fetched), spilled (attended from the host tier) and the hit rate.
fn print_tier_stats(eng: &Engine) {
    let st = eng.cache().stats();
    eprintln!(
        "  fast tier: {} hits, {} misses, {} spilled ({:.1}% hit)",
        st.hits,
        st.misses,
        st.spilled,
        st.hit_rate() * 100.0
    );
}

/// An engine over a fresh cache with room for `seqs` sequences of `seq_tokens` tokens;
/// also returns the cache's configured bytes (both tiers).
fn engine(b: &Bench, c: &Cli, algo: &str, seqs: usize, seq_tokens: usize) -> Result<(Engine, u64)> {
    let a = by_name(algo, c.budget).with_context(|| format!("--algo {algo} --budget {}", c.budget))?;
    let page = c.page_size.or(a.page_size_hint()).unwrap_or(16);
    let mut cc = (b.model)
        .cache_config_for(seqs, seq_tokens, page, c.fast_fraction)
        .context("batch × (prompt + new tokens) overflows")?;
    if c.fast_home_fraction > 0.0 {
        cc = cc.with_fast_homes(c.fast_home_fraction, c.fast_fraction);
    }
    cc.fetch_mode = match c.fetch {
        Fetch::InKernel => FetchMode::InKernel,
        Fetch::SideStream => FetchMode::SideStream,
        Fetch::InOrder => FetchMode::InOrder,
    };
    cc.page_layout = match c.page_layout {
        Layout::Interleaved => PageLayout::Interleaved,
        Layout::ByDirectory => PageLayout::ByDirectory,
    };
    // A sparse step selects about budget / context of each request's pages, and the
    // next step re-selects ~90% of them: a cache smaller than that share thrashes
    // (docs/BENCHMARKS.md, "A real model's selections through the engine").
    let share = c.budget as f64 / seq_tokens.max(1) as f64;
    if algo != "dense" && c.fast_fraction < 1.0 && c.fast_fraction < 2.0 * share {
        eprintln!(
            "warning: --fast-fraction {} caches less than twice the share of pages a step selects \
             (budget {} of {seq_tokens} tokens = {:.1}%): expect most requests to miss",
            c.fast_fraction,
            c.budget,
            share * 100.0
        );
    }
    let bytes = ((cc.host_pages + cc.fast_pages + cc.fast_home_pages) * cc.page_bytes()) as u64;
    let cache = SpinCache::new_boxed(cc, a)?;
    let cfg = EngineConfig {
        max_running: seqs.max(1),
        max_prefill_tokens: c.max_prefill_tokens,
        eos_token_ids: if c.ignore_eos { Vec::new() } else { b.eos.clone() },
        decode_mode: decode_mode(c),
    };
    Ok((
        Engine::new(b.model.clone(), Box::new(cache), b.tokenizer.clone(), cfg)?,
        bytes,
    ))
}

/// One configuration's results (a CSV row, a table line).
struct Row {
    mode: &'static str,
    algo: String,
    /// Batch size, or number of requests.
    batch: usize,
    context: String,
    new_tokens: usize,
    decode_tps: f64,
    /// Decode tokens/s of the decode-only steps that carried every request of the run
    /// (the steady state at batch B, what the PyTorch anchor measures); offline only.
    full_batch_tps: f64,
    /// [`Self::full_batch_tps`] without the steps that warmed up or captured a graph.
    steady_tps: f64,
    output_tps: f64,
    req_s: f64,
    lat: LatencySummary,
    /// Bytes, and where they come from.
    mem: (u64, &'static str),
    accuracy: Option<f64>,
}

impl Row {
    /// A row from the completions and the engine's metrics; memory is the device peak
    /// when known, else the cache's configured bytes.
    #[allow(clippy::too_many_arguments)]
    fn new(
        mode: &'static str,
        algo: &str,
        context: String,
        new_tokens: usize,
        done: &[Completion],
        m: &EngineMetrics,
        peak: Option<u64>,
        cache_bytes: u64,
    ) -> Self {
        Row {
            mode,
            algo: algo.into(),
            batch: done.len(),
            context,
            new_tokens,
            decode_tps: if m.decode_only_tokens > 0 {
                m.decode_tps()
            } else {
                f64::NAN
            },
            full_batch_tps: f64::NAN,
            steady_tps: f64::NAN,
            output_tps: m.output_tps(),
            req_s: done.len() as f64 / m.busy_secs.max(1e-9),
            lat: LatencySummary::of(done.iter().map(|c| &c.timings)),
            mem: peak.map_or((cache_bytes, "cache config"), |p| (p, "device peak")),
            accuracy: None,
        }
    }

    const COLUMNS: &'static str =
        "mode,algo,batch_or_requests,context,new_tokens,decode_tok_s,full_batch_decode_tok_s,steady_decode_tok_s,\
        output_tok_s,req_s,\
        ttft_p50_ms,ttft_p99_ms,tpot_p50_ms,tpot_p99_ms,itl_p50_ms,itl_p99_ms,mem_gb,mem_source,accuracy";

    /// The values of the [`Self::COLUMNS`] (empty where not measured).
    fn cells(&self) -> Vec<String> {
        let f = |x: f64| {
            if x.is_finite() {
                format!("{x:.2}")
            } else {
                String::new()
            }
        };
        let ms = |d: Option<Duration>| f(d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3));
        let l = &self.lat;
        let mut v = vec![
            self.mode.to_string(),
            self.algo.clone(),
            self.batch.to_string(),
            self.context.clone(),
        ];
        v.push(self.new_tokens.to_string());
        v.extend(
            [
                self.decode_tps,
                self.full_batch_tps,
                self.steady_tps,
                self.output_tps,
                self.req_s,
            ]
            .map(f),
        );
        v.extend([l.ttft, l.tpot, l.itl].into_iter().flat_map(|p| [ms(p.p50), ms(p.p99)]));
        v.extend([format!("{:.3}", self.mem.0 as f64 / 1e9), self.mem.1.to_string()]);
        v.push(f(self.accuracy.unwrap_or(f64::NAN)));
        v
    }
}

/// Submits `reqs` at once to a fresh engine sized for them, runs its steps to the end
/// (progress to stderr; the most device memory in use is sampled after each step), and
/// returns the row and the completions. Fails if any request failed.
fn run_batch(
    b: &Bench,
    c: &Cli,
    algo: &str,
    reqs: Vec<Request>,
    mode: &'static str,
    ctx: String,
) -> Result<(Row, Vec<Completion>)> {
    let len = |r: &Request| match &r.prompt {
        Prompt::Tokens(t) => t.len(),
        Prompt::Text(_) => unreachable!("prompts here are token ids"),
    };
    let (longest, n) = reqs
        .iter()
        .fold((0, 0), |(l, n), r| (l.max(len(r)), n.max(r.max_new_tokens)));
    let label = format!(
        "{mode} {algo}: {} requests, prompts ≤ {longest}, {n} new tokens",
        reqs.len()
    );
    eprintln!("{label}...");
    let (mut eng, bytes) = engine(b, c, algo, reqs.len(), longest + n)?;
    let batch = reqs.len();
    if c.trace_dir.is_some() {
        eng.record_selections(true)?;
    }
    let handles = reqs
        .into_iter()
        .map(|r| eng.submit(r))
        .collect::<spinkv::Result<Vec<_>>>()?;
    let dev = eng.model().device().clone();
    let (mut peak, mut last) = (device_memory_used(&dev), Instant::now());
    // Device memory after the engine's allocations, and the peaks seen after steps
    // with prefill tokens and after decode-only steps (where a peak comes from).
    let (at_init, mut peak_prefill, mut peak_decode) = (peak, None::<u64>, None::<u64>);
    let total = handles.len();
    let (mut full_tokens, mut full_secs, mut decode_steps) = (0usize, 0f64, 0usize);
    let (mut steady_tokens, mut steady_secs) = (0usize, 0f64);
    // Full-batch steps that fell back to the ragged eager path, and their time.
    let (mut fallback_steps, mut fallback_secs) = (0usize, 0f64);
    // A padded step run eagerly is the warm-up of a capture, except where every padded
    // step runs that way (`--decode padded`).
    let padded_is_warmup = eng.decode_mode() != DecodeMode::Padded;
    // Sequences each profiled step carried (a profile of fewer than `total` is not the
    // batch the run names).
    let mut profiled = Vec::new();
    while eng.has_work() {
        let profiling = c.profile_steps > 0 && (PROFILE_AFTER..PROFILE_AFTER + c.profile_steps).contains(&decode_steps);
        if profiling && decode_steps == PROFILE_AFTER {
            spinkv::ops::profiler_range(&dev, true)?;
        }
        let before = eng.decode_counters();
        let r = eng.step()?;
        let after = eng.decode_counters();
        if r.prefill_tokens == 0 && r.decodes > 0 {
            decode_steps += 1;
        }
        if r.prefill_tokens == 0 && r.decodes == total {
            full_tokens += r.sampled;
            full_secs += r.elapsed.as_secs_f64();
            let warmup = after.captures > before.captures
                || after.errors > before.errors
                || (padded_is_warmup && after.padded_eager > before.padded_eager);
            if after.fallbacks > before.fallbacks {
                fallback_steps += 1;
                fallback_secs += r.elapsed.as_secs_f64();
            } else if !warmup {
                steady_tokens += r.sampled;
                steady_secs += r.elapsed.as_secs_f64();
            }
        }
        if profiling {
            profiled.push(r.decodes);
        }
        if profiling && decode_steps == PROFILE_AFTER + c.profile_steps {
            spinkv::ops::profiler_range(&dev, false)?;
        }
        let now = device_memory_used(&dev);
        peak = peak.max(now);
        let phase = if r.prefill_tokens > 0 {
            &mut peak_prefill
        } else {
            &mut peak_decode
        };
        *phase = (*phase).max(now);
        if last.elapsed() > Duration::from_secs(5) {
            let m = eng.metrics();
            let (p, d, r, w) = (m.prefill_tokens, m.decode_tokens, m.running, m.waiting);
            eprintln!("  {p} prompt + {d} output tokens, {r} running, {w} waiting");
            last = Instant::now();
        }
    }
    let done: Vec<Completion> = handles.into_iter().map(|h| h.wait()).collect();
    if let Some(c) = done.iter().find(|c| matches!(c.finish_reason, FinishReason::Error(_))) {
        bail!("{label}: request {:?} failed: {}", c.id, c.finish_reason);
    }
    eprintln!("  decode {:?}: {:?}", eng.decode_mode(), eng.metrics().decode);
    if c.profile_steps > 0 {
        eprintln!(
            "  profiled {} step(s), carrying {profiled:?} of {total} requests{}",
            profiled.len(),
            if profiled.iter().any(|&d| d < total) {
                " (fewer than the whole batch: some requests had finished or were still \
                 prefilling; raise --new-tokens so that every request decodes together)"
            } else {
                ""
            }
        );
    }
    print_tier_stats(&eng);
    if at_init.is_some() {
        let gb = |b: Option<u64>| b.map_or("—".to_string(), |b| format!("{:.1} GB", b as f64 / 1e9));
        eprintln!(
            "  device memory: {} with the engine built; peak {} after prefill steps, {} after decode-only steps",
            gb(at_init),
            gb(peak_prefill),
            gb(peak_decode)
        );
    }
    if c.host_timing {
        eprintln!("  host time by part (µs total, spans, µs per span):");
        for (label, d, n) in spinkv::host_timing::report() {
            let us = d.as_secs_f64() * 1e6;
            eprintln!("    {label:<28} {us:>12.0} {n:>8} {:>10.1}", us / n.max(1) as f64);
        }
        spinkv::host_timing::reset();
    }
    if let Some(e) = eng.last_decode_error() {
        eprintln!("  last padded-decode error (that step ran eagerly): {e}");
    }
    if let Some(dir) = &c.trace_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("--trace-dir {}", dir.display()))?;
        let path = dir.join(format!("{mode}_{algo}_{ctx}_b{batch}.csv"));
        let records = eng.take_selections();
        let f = std::io::BufWriter::new(std::fs::File::create(&path).with_context(|| path.display().to_string())?);
        spinkv::trace::write_csv(f, &records)?;
        eprintln!("  {} selection records: {}", records.len(), path.display());
    }
    if fallback_steps > 0 {
        eprintln!(
            "  {fallback_steps} full-batch step(s) fell back to the ragged eager path ({:.1} ms in all): \
             left out of the steady tok/s, kept in the full-batch tok/s",
            fallback_secs * 1e3
        );
    }
    let mut row = Row::new(mode, algo, ctx, n, &done, &eng.metrics(), peak, bytes);
    if full_tokens > 0 {
        row.full_batch_tps = full_tokens as f64 / full_secs.max(1e-9);
        if steady_tokens > 0 {
            row.steady_tps = steady_tokens as f64 / steady_secs.max(1e-9);
        }
    } else if total > 1 {
        // Requests decode about a token per mixed step while the others prefill.
        let chunks = (eng.metrics().prefill_tokens as usize).div_ceil(c.max_prefill_tokens);
        eprintln!(
            "  note: no decode-only step carried all {total} requests, so there is no full-batch \
             tok/s: the first requests finished while the last were still prefilling \
             (~{chunks} prefill steps of --max-prefill-tokens {}); raise --new-tokens above that",
            c.max_prefill_tokens
        );
    }
    Ok((row, done))
}

fn random_prompt(rng: &mut StdRng, len: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|_| rng.random_range(0..vocab as u32)).collect()
}

fn offline(b: &Bench, c: &Cli, algo: &str, batch: usize, ctx: usize, n: usize) -> Result<Row> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let vocab = b.model.config().vocab_size;
    let reqs = (0..batch).map(|_| Request::tokens(random_prompt(&mut rng, ctx, vocab), n).with_ignore_eos(true));
    Ok(run_batch(b, c, algo, reqs.collect(), "offline", ctx.to_string())?.0)
}

/// Grows B from the largest `--batch` (doubling, then bisecting to within 1/8) while a
/// run succeeds; a cache that cannot be built or a failed request (device OOM) ends it.
fn find_max_batch(b: &Bench, c: &Cli, algo: &str, o: &OfflineArgs) -> Result<Row> {
    let limit = o.max_batch_limit;
    let (mut ok, mut fail, mut best) = (None::<usize>, None::<usize>, None::<Row>);
    let mut try_b = o.batch.iter().copied().max().unwrap_or(1).min(limit);
    loop {
        match offline(b, c, algo, try_b, o.context, o.new_tokens) {
            Ok(r) => (ok, best) = (Some(try_b), Some(r)),
            Err(e) => {
                eprintln!("  B={try_b} does not fit: {e:#}");
                fail = Some(try_b);
            }
        }
        try_b = match (ok, fail) {
            (Some(o), None) if o >= limit => break,
            (Some(o), None) => (o * 2).min(limit),
            (None, Some(f)) if f <= 1 => break,
            (None, Some(f)) => f / 2,
            (Some(o), Some(f)) if f - o <= (o / 8).max(1) => break,
            (Some(o), Some(f)) => o + (f - o) / 2,
            (None, None) => unreachable!("one run was made"),
        };
    }
    let mut row = best.ok_or_else(|| anyhow!("--find-max-batch: not even B=1 fits for {algo}"))?;
    row.mode = "max-batch";
    eprintln!("largest batch that fits for {algo}: {} (limit {limit})", row.batch);
    Ok(row)
}

fn online(b: &Bench, c: &Cli, algo: &str, o: &OnlineArgs) -> Result<Row> {
    let (r, rate, range, n) = (o.requests, o.rate, o.prompt_range, o.new_tokens);
    eprintln!(
        "online {algo}: {r} requests at {rate} req/s, prompts {}:{}, {n} new tokens",
        range.0, range.1
    );
    let (eng, bytes) = engine(b, c, algo, o.max_running, range.1 + n)?;
    let dev = eng.model().device().clone();
    let vocab = b.model.config().vocab_size;
    let mut rng = StdRng::seed_from_u64(c.seed);
    let mut at = 0.0;
    let plan: Vec<(f64, Vec<u32>)> = (0..r)
        .map(|_| {
            at += -(1.0 - rng.random::<f64>()).ln() / rate;
            let len = rng.random_range(range.0..=range.1);
            (at, random_prompt(&mut rng, len, vocab))
        })
        .collect();
    let client = eng.spawn()?;
    let t0 = Instant::now();
    let driver = {
        let client = client.clone();
        std::thread::spawn(move || -> spinkv::Result<Vec<_>> {
            let mut handles = Vec::with_capacity(plan.len());
            for (at, prompt) in plan {
                let wait = Duration::from_secs_f64(at).saturating_sub(t0.elapsed());
                std::thread::sleep(wait);
                handles.push(client.submit(Request::tokens(prompt, n).with_ignore_eos(true))?);
            }
            Ok(handles)
        })
    };
    let handles = driver.join().map_err(|_| anyhow!("the driver thread panicked"))??;
    let mut done = Vec::with_capacity(r);
    let mut peak = device_memory_used(&dev);
    for (i, h) in handles.into_iter().enumerate() {
        done.push(h.wait());
        peak = peak.max(device_memory_used(&dev));
        if (i + 1) % (r / 10).max(1) == 0 {
            eprintln!("  {}/{r} done ({:.1}s)", i + 1, t0.elapsed().as_secs_f64());
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    if let Some(c) = done.iter().find(|c| matches!(c.finish_reason, FinishReason::Error(_))) {
        bail!("online {algo}: request {:?} failed: {}", c.id, c.finish_reason);
    }
    let eng = client.shutdown()?;
    print_tier_stats(&eng);
    let mut row = Row::new(
        "online",
        algo,
        format!("{}:{}", range.0, range.1),
        n,
        &done,
        &eng.metrics(),
        peak,
        bytes,
    );
    row.req_s = r as f64 / wall;
    row.output_tps = done.iter().map(|c| c.tokens.len()).sum::<usize>() as f64 / wall;
    Ok(row)
}

fn accuracy(b: &Bench, c: &Cli, algo: &str, a: &AccuracyArgs) -> Result<Row> {
    let tok = b
        .tokenizer
        .as_ref()
        .context("accuracy needs a real model with a tokenizer (--model), not --random-weights")?;
    let ctx = a.context;
    let mut keys = KeyGen::new(c.seed);
    let mut prompts = Vec::new();
    for &depth in &a.depths {
        for _ in 0..a.trials {
            let key = keys.next_key();
            prompts.push((key, build_prompt(tok, ctx, depth, key)?.0));
        }
    }
    let reqs = prompts
        .iter()
        .map(|(_, p)| Request::tokens(p.clone(), a.new_tokens))
        .collect();
    let (mut row, done) = run_batch(b, c, algo, reqs, "accuracy", ctx.to_string())?;
    let mut correct = 0;
    for (d, (key, _)) in done.iter().zip(&prompts) {
        correct += is_correct(&d.text, *key) as usize;
        eprintln!("  key {key} -> {:?}", d.text.trim());
    }
    row.accuracy = Some(correct as f64 / prompts.len() as f64);
    Ok(row)
}

/// Throughput against batch (offline rows) and the TTFT distribution (every row).
fn plots(dir: &Path, rows: &[Row], algos: &[String]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("--plot-dir {}", dir.display()))?;
    let offline = |r: &&Row| r.mode == "offline" && r.decode_tps.is_finite();
    let tput: Vec<(String, Vec<(f64, f64)>)> = algos
        .iter()
        .map(|a| {
            let pts = rows
                .iter()
                .filter(offline)
                .filter(|r| &r.algo == a)
                .map(|r| (r.batch as f64, r.decode_tps));
            (a.clone(), pts.collect())
        })
        .filter(|s: &(String, Vec<_>)| !s.1.is_empty())
        .collect();
    if !tput.is_empty() {
        let axes = ("batch (requests)", "decode tokens/s");
        plot(
            &dir.join("throughput_vs_batch.svg"),
            "decode tokens/s against batch",
            axes,
            &tput,
            true,
        )?;
    }
    let cdf: Vec<(String, Vec<(f64, f64)>)> = rows
        .iter()
        .filter(|r| !r.lat.ttfts.is_empty())
        .map(|r| {
            let mut v: Vec<f64> = r.lat.ttfts.iter().map(|d| d.as_secs_f64() * 1e3).collect();
            v.sort_by(f64::total_cmp);
            let n = v.len() as f64;
            let pts = v.iter().enumerate().map(|(k, &t)| (t, (k + 1) as f64 / n)).collect();
            (format!("{} {} {}", r.mode, r.algo, r.batch), pts)
        })
        .collect();
    if !cdf.is_empty() {
        let axes = ("TTFT (ms)", "fraction of requests");
        plot(&dir.join("ttft_cdf.svg"), "TTFT distribution (CDF)", axes, &cdf, false)?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let c = Cli::parse();
    ensure!(
        !(c.random_weights && matches!(c.mode, Mode::Accuracy(_))),
        "accuracy needs a real model (--model), not --random-weights"
    );
    spinkv::host_timing::enable(c.host_timing);
    #[cfg(feature = "cuda")]
    spinkv::ops::set_prefill_wgmma(c.prefill_kernel == "auto");
    let b = load(&c)?;
    eprintln!(
        "model: {} on {:?}: {:?}",
        b.name,
        b.model.device().location(),
        b.model.config()
    );
    let mut rows = Vec::new();
    for algo in &c.algo {
        match &c.mode {
            Mode::Offline(o) => {
                for &bs in &o.batch {
                    rows.push(offline(&b, &c, algo, bs, o.context, o.new_tokens)?);
                }
                if o.find_max_batch {
                    rows.push(find_max_batch(&b, &c, algo, o)?);
                }
            }
            Mode::Online(o) => rows.push(online(&b, &c, algo, o)?),
            Mode::Accuracy(a) => rows.push(accuracy(&b, &c, algo, a)?),
        }
    }
    if let Some(path) = &c.csv {
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("--csv {}", path.display()))?);
        writeln!(f, "{}", Row::COLUMNS)?;
        for r in &rows {
            writeln!(f, "{}", r.cells().join(","))?;
        }
        f.flush()?;
        eprintln!("CSV: {}", path.display());
    }
    if let Some(dir) = &c.plot_dir {
        plots(dir, &rows, &c.algo)?;
    }
    println!(
        "\n{} · budget {} · fast fraction {} · fast homes {} · fetch {:?} · page layout {:?} · prefill chunk {} tokens",
        b.name, c.budget, c.fast_fraction, c.fast_home_fraction, c.fetch, c.page_layout, c.max_prefill_tokens
    );
    println!("decode tok/s = tokens of decode-only steps / their wall time; latencies in ms; memory in GB\n");
    println!("| {} |", Row::COLUMNS.replace(',', " | "));
    println!("|{}", "---|".repeat(Row::COLUMNS.split(',').count()));
    for r in &rows {
        println!("| {} |", r.cells().join(" | "));
    }
    Ok(())
}
