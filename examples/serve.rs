//! An OpenAI-compatible HTTP server over spinkv's serving engine.
//!
//! `cargo run --release --example serve -- --algo quest --budget 1024 --port 8000`
//!
//! then
//!
//! ```text
//! curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
//!   -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32}'
//! ```
//!
//! It binds 127.0.0.1 unless `--host` says otherwise. See `spinkv::server` for the
//! endpoints and fields.

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Parser;
use spinkv::engine::{Engine, EngineConfig};
use spinkv::models::fetch::ModelSpec;
use spinkv::models::{dtype_by_name, load_model};
use spinkv::partition::{by_name, ALGORITHMS};
use spinkv::server::{serve, ServerConfig};
use spinkv::{SparseKvCache, SpinCache};
use std::net::{IpAddr, SocketAddr};

#[derive(Parser, Debug)]
#[command(about = "OpenAI-compatible server (/v1/completions, /v1/chat/completions) over spinkv's engine")]
struct Args {
    /// `default` (SmolLM2-135M-Instruct), a local GGUF file or HF folder, or a Hub id.
    #[arg(long, default_value = "default")]
    model: String,
    /// Model id reported by /v1/models and expected in requests (default: from --model).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Sparse attention algorithm.
    #[arg(long, default_value = "quest", value_parser = clap::builder::PossibleValuesParser::new(ALGORITHMS))]
    algo: String,
    /// Token budget of the sparse algorithm per decode step and KV head.
    #[arg(long, default_value_t = 1024)]
    budget: usize,
    /// Address to bind (loopback by default; 0.0.0.0 exposes the server to the network).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Run on the GPU (needs `--features cuda`).
    #[arg(long)]
    cuda: bool,
    /// Weight and KV dtype: f32, f16 or bf16 (default: f32 on CPU, f16 on GPU).
    #[arg(long)]
    dtype: Option<String>,
    /// KV cache capacity in tokens, over all requests.
    #[arg(long, default_value_t = 65_536)]
    cache_tokens: usize,
    /// Fraction of the KV that fits the fast tier (1.0 = everything).
    #[arg(long, default_value_t = 1.0)]
    fast_fraction: f64,
    /// Longest prompt accepted, in tokens (default: the model's context).
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
    /// `max_tokens` of requests that give none.
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
    /// Most requests running at once.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = if args.cuda {
        spinkv::ops::cuda_device(0).context("--cuda needs a GPU and a build with --features cuda")?
    } else {
        Device::Cpu
    };
    let dtype = dtype_by_name(args.dtype.as_deref(), args.cuda)?;
    let spec = ModelSpec::parse(&args.model)?;
    let lm = load_model(&spec, dtype, &device, true)?;
    let model_id = args.served_model_name.clone().unwrap_or_else(|| {
        let src = lm.source.trim_end_matches('/');
        let name = src.rsplit(['/', '\\']).next().unwrap_or(src);
        name.trim_end_matches(".gguf").to_string()
    });
    let algo = by_name(&args.algo, args.budget)?;
    let page_size = algo.page_size_hint().unwrap_or(16);
    let ccfg = lm
        .model
        .cache_config(args.cache_tokens, args.fast_fraction)
        .with_page_size(page_size);
    let cache = SpinCache::new_boxed(ccfg, algo)?;
    eprintln!(
        "model {model_id} ({}) · cache {} · {} tokens · page {page_size} · fast tier {:.0}%",
        lm.source,
        cache.algorithm_name(),
        args.cache_tokens,
        args.fast_fraction * 100.0
    );
    let cfg = EngineConfig {
        max_running: args.max_running,
        ..EngineConfig::default()
    };
    let client = Engine::from_loaded(lm, Box::new(cache), cfg)?.spawn()?;
    let server = ServerConfig {
        max_prompt_tokens: args.max_prompt_tokens,
        default_max_tokens: args.default_max_tokens,
        ..ServerConfig::new(model_id)
    };
    let addr = SocketAddr::new(args.host, args.port);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    eprintln!("listening on http://{addr} (POST /v1/completions, /v1/chat/completions; GET /v1/models, /health)");
    rt.block_on(serve(addr, client, server))
        .with_context(|| format!("serving on {addr}"))?;
    Ok(())
}
