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

#[path = "../common/device.rs"]
mod device;
#[path = "../common/plot.rs"]
mod plot;

mod cli;
mod report;
mod runs;

use cli::*;
use report::*;
use runs::*;

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

/// The model under test.
pub(crate) struct Bench {
    pub(crate) model: Llama,
    pub(crate) tokenizer: Option<Tokenizer>,
    pub(crate) eos: Vec<u32>,
    pub(crate) name: String,
}

pub(crate) fn load(c: &Cli) -> Result<Bench> {
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
pub(crate) fn print_tier_stats(eng: &Engine) {
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
pub(crate) fn engine(b: &Bench, c: &Cli, algo: &str, seqs: usize, seq_tokens: usize) -> Result<(Engine, u64)> {
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
        reserve_pages: !c.no_reserve,
    };
    Ok((
        Engine::new(b.model.clone(), Box::new(cache), b.tokenizer.clone(), cfg)?,
        bytes,
    ))
}

fn main() -> Result<()> {
    let c = Cli::parse();
    ensure!(
        !(c.random_weights && matches!(c.mode, Mode::Accuracy(_))),
        "accuracy needs a real model (--model), not --random-weights"
    );
    spinkv::host_timing::enable(c.host_timing);
    #[cfg(feature = "cuda")]
    spinkv::ops::set_prefill_wgmma(c.prefill_kernel != "mma");
    #[cfg(feature = "cuda")]
    spinkv::ops::set_prefill_pingpong(match c.prefill_kernel.as_str() {
        "pingpong" => spinkv::ops::PrefillPingPong::Always,
        "plain" => spinkv::ops::PrefillPingPong::Never,
        _ => spinkv::ops::PrefillPingPong::Auto,
    });
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
