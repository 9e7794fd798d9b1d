//! serve_bench's command line: the options every mode shares, the three modes' own, and
//! their value parsers.

use super::*;

#[derive(Parser, Debug)]
#[command(about = "End-to-end benchmark of spinkv's serving engine")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) mode: Mode,
    /// `default` (SmolLM2-135M-Instruct), a GGUF file or HF folder, or a Hub id.
    #[arg(long, global = true)]
    pub(crate) model: Option<String>,
    /// A named shape with random weights (needs --random-weights).
    #[arg(long, global = true, value_parser = PossibleValuesParser::new(SHAPES))]
    pub(crate) shape: Option<String>,
    /// Random weights at --shape (prompts are random token ids; no tokenizer).
    #[arg(long, global = true)]
    pub(crate) random_weights: bool,
    /// Weight/KV dtype (default: bf16 for random weights on CUDA, f16 for a real model
    /// on CUDA, f32 on the CPU).
    #[arg(long, global = true, value_parser = ["f32", "f16", "bf16"])]
    pub(crate) dtype: Option<String>,
    /// Run on the GPU (needs a build with `--features cuda`).
    #[arg(long, global = true)]
    pub(crate) cuda: bool,
    /// Algorithms to compare (comma-separated).
    #[arg(long, global = true, value_delimiter = ',', default_value = "dense",
          value_parser = PossibleValuesParser::new(ALGORITHMS.iter().chain(VARIANTS)))]
    pub(crate) algo: Vec<String>,
    /// Token budget of the sparse algorithms per decode step and KV head.
    #[arg(long, global = true, default_value_t = 2048, value_parser = at_least_1)]
    pub(crate) budget: usize,
    /// Fraction of the KV that fits the fast tier, in [0, 1] (1: every page has its own
    /// fast slot, direct-mapped, no replacement).
    #[arg(long, global = true, default_value_t = 1.0, value_parser = fraction)]
    pub(crate) fast_fraction: f64,
    /// Fraction of the KV pages whose home is the fast tier (HBM), in [0, 1): the rest
    /// live in pinned host memory, cached by a fast tier of --fast-fraction of them.
    /// The capacity is then HBM plus host.
    #[arg(long, global = true, default_value_t = 0.0, value_parser = fraction)]
    pub(crate) fast_home_fraction: f64,
    /// How a tiered step reads the pages its fast tier misses (`CacheConfig::fetch_mode`):
    /// in-kernel (the default: inside the attention launch), side-stream (copied on a
    /// second stream while resident pages are attended; `--cuda` only) or in-order.
    #[arg(long, global = true, value_enum, default_value_t = Fetch::InKernel)]
    pub(crate) fetch: Fetch,
    /// Allocate a request's pages as it grows instead of all at admission
    /// (`EngineConfig::reserve_pages` off), for comparison.
    #[arg(long, global = true)]
    pub(crate) no_reserve: bool,
    /// Tokens per KV page (default: the algorithm's own, else 16).
    #[arg(long, global = true)]
    pub(crate) page_size: Option<usize>,
    /// Where a new page's slots go (`CacheConfig::page_layout`): interleaved (a page's
    /// layers and KV heads side by side) or by-directory (each (layer, KV head)'s pages
    /// side by side).
    #[arg(long, global = true, value_enum, default_value_t = Layout::Interleaved)]
    pub(crate) page_layout: Layout,
    /// Prompt tokens per engine step (the chunked-prefill budget).
    #[arg(long, global = true, default_value_t = 512, value_parser = at_least_1)]
    pub(crate) max_prefill_tokens: usize,
    /// Seed of the weights, prompts, arrivals and keys.
    #[arg(long, global = true, default_value_t = 1234)]
    pub(crate) seed: u64,
    /// Write one CSV row per configuration here.
    #[arg(long, global = true)]
    pub(crate) csv: Option<PathBuf>,
    /// Write SVG plots (throughput against batch, TTFT distribution) into this folder.
    #[arg(long, global = true)]
    pub(crate) plot_dir: Option<PathBuf>,
    /// Record every decode selection (step, layer, request, KV head, pages) of each run
    /// and write it here as `MODE_ALGO_CONTEXT_bBATCH.csv`, the trace format
    /// `cache_sim --traces` replays. Decode steps then run eagerly.
    #[arg(long, global = true)]
    pub(crate) trace_dir: Option<PathBuf>,
    /// Keep decoding past end-of-sequence tokens, to --new-tokens (e.g. for longer
    /// selection traces of a real model).
    #[arg(long, global = true)]
    pub(crate) ignore_eos: bool,
    /// How decode-only steps run: `auto` (CUDA graphs on CUDA, else eager), `eager`,
    /// `padded` (the graphs' padded work, run eagerly) or `graphs`.
    #[arg(long, global = true, default_value = "auto", value_parser = ["auto", "eager", "padded", "graphs"])]
    pub(crate) decode: String,
    /// Shorthand for `--decode eager` (no CUDA graphs), for comparison.
    #[arg(long, global = true)]
    pub(crate) no_graphs: bool,
    /// The prefill attention kernel on CUDA: `auto` (wgmma on a compute capability 9.0
    /// device for head dims 64/128, its warpgroups in ping-pong where most keys are earlier
    /// pages; else mma.sync), `pingpong` / `plain` (wgmma with / without the ping-pong
    /// always) or `mma` (mma.sync always), for comparison (`spinkv::ops::set_prefill_wgmma`,
    /// `set_prefill_pingpong`).
    #[arg(long, global = true, default_value = "auto", value_parser = ["auto", "pingpong", "plain", "mma"])]
    pub(crate) prefill_kernel: String,
    /// Profile this many decode-only steps, after the first four (past warm-up and
    /// capture): the CUDA profiler's collection is on only around them, for
    /// `ncu --profile-from-start off`. The run prints how many requests each profiled
    /// step carried (a step profiled while others prefill carries fewer). 0: off.
    #[arg(long, global = true, default_value_t = 0)]
    pub(crate) profile_steps: usize,
    /// Print the host time of the engine's steps broken down by part
    /// (`spinkv::host_timing`), after each configuration.
    #[arg(long, global = true)]
    pub(crate) host_timing: bool,
}

/// Decode-only steps run before `--profile-steps` starts collecting.
pub(crate) const PROFILE_AFTER: usize = 4;

pub(crate) fn decode_mode(c: &Cli) -> DecodeMode {
    match (c.no_graphs, c.decode.as_str()) {
        (true, _) | (_, "eager") => DecodeMode::Eager,
        (_, "padded") => DecodeMode::Padded,
        (_, "graphs") => DecodeMode::Graphs,
        _ => DecodeMode::Auto,
    }
}

/// `--page-layout` (`spinkv::PageLayout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Layout {
    Interleaved,
    ByDirectory,
}

/// `--fetch`: a tiered step's miss path (`spinkv::FetchMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Fetch {
    InKernel,
    SideStream,
    InOrder,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Mode {
    /// B requests of L prompt tokens and N new tokens each, all submitted at once.
    Offline(OfflineArgs),
    /// R requests with Poisson arrivals, the engine on its own thread.
    Online(OnlineArgs),
    /// Passkey retrieval at several depths (real model), one batch per algorithm.
    Accuracy(AccuracyArgs),
}

#[derive(clap::Args, Debug)]
pub(crate) struct OfflineArgs {
    /// Batch sizes B to run, each with a fresh engine.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64", value_parser = at_least_1)]
    pub(crate) batch: Vec<usize>,
    /// Prompt tokens L per request.
    #[arg(long, default_value_t = 1024, value_parser = at_least_1)]
    pub(crate) context: usize,
    /// New tokens N per request.
    #[arg(long, default_value_t = 64, value_parser = at_least_1)]
    pub(crate) new_tokens: usize,
    /// Then grow B (doubling, then bisecting) until the cache or the device fails.
    #[arg(long)]
    pub(crate) find_max_batch: bool,
    /// Largest B --find-max-batch tries (on the CPU a failed host allocation aborts).
    #[arg(long, default_value_t = 1024, value_parser = at_least_1)]
    pub(crate) max_batch_limit: usize,
}

#[derive(clap::Args, Debug)]
pub(crate) struct OnlineArgs {
    /// Requests R.
    #[arg(long, default_value_t = 32, value_parser = at_least_1)]
    pub(crate) requests: usize,
    /// Mean arrival rate, requests/s (Poisson process, seeded).
    #[arg(long, default_value_t = 1.0, value_parser = positive)]
    pub(crate) rate: f64,
    /// Prompt lengths, uniform in MIN:MAX tokens.
    #[arg(long, default_value = "128:1024", value_parser = parse_range)]
    pub(crate) prompt_range: (usize, usize),
    /// New tokens per request.
    #[arg(long, default_value_t = 64, value_parser = at_least_1)]
    pub(crate) new_tokens: usize,
    /// Most requests running at once (sizes the cache).
    #[arg(long, default_value_t = 16, value_parser = at_least_1)]
    pub(crate) max_running: usize,
}

#[derive(clap::Args, Debug)]
pub(crate) struct AccuracyArgs {
    /// Prompt length in tokens (approximate).
    #[arg(long, default_value_t = 1024, value_parser = at_least_1)]
    pub(crate) context: usize,
    /// Depths of the key, fractions of the haystack in [0, 1].
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.5,0.9", value_parser = fraction)]
    pub(crate) depths: Vec<f64>,
    /// Trials per depth, each with a fresh key.
    #[arg(long, default_value_t = 2, value_parser = at_least_1)]
    pub(crate) trials: usize,
    /// Answer tokens (greedy, stops at EOS).
    #[arg(long, default_value_t = 8, value_parser = at_least_1)]
    pub(crate) new_tokens: usize,
}

pub(crate) fn at_least_1(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be >= 1".into()),
        r => r.map_err(|e| e.to_string()),
    }
}

pub(crate) fn fraction(s: &str) -> std::result::Result<f64, String> {
    let x: f64 = s.trim().parse().map_err(|e| format!("{e}"))?;
    (0.0..=1.0)
        .contains(&x)
        .then_some(x)
        .ok_or(format!("{x} is not in [0, 1]"))
}

pub(crate) fn positive(s: &str) -> std::result::Result<f64, String> {
    let x: f64 = s.trim().parse().map_err(|e| format!("{e}"))?;
    (x.is_finite() && x > 0.0)
        .then_some(x)
        .ok_or(format!("{x} is not a positive number"))
}

pub(crate) fn parse_range(s: &str) -> std::result::Result<(usize, usize), String> {
    let (a, b) = s.split_once(':').ok_or("expected MIN:MAX, e.g. 128:1024")?;
    let (a, b) = (at_least_1(a)?, at_least_1(b)?);
    (a <= b).then_some((a, b)).ok_or(format!("MIN ({a}) > MAX ({b})"))
}
