//! InfLLM's decode ops one by one (`spinkv::ops::infllm`, plus the shared top-k), at a
//! decode step's shapes: B rows of one token each at `--context`, the geometry of
//! `InfLlmConfig::for_budget(--budget)`. On CUDA each op is captured `LAYERS` times back
//! to back in one CUDA graph (as a model's layers replay it), and the graph is replayed:
//! the figure is wall time / (replays · LAYERS), the device time per launch once the
//! replays keep the GPU busy. On the CPU the ops run eagerly (the reference path).
//!
//! `cargo run --release --features cuda --example infllm_bench -- --cuda [--shape
//! smollm2|llama8b] [--batches 16,64] [--context 8192] [--budget 1024] [--csv FILE]`
//!
//! Prints a markdown table: per op and batch, µs per launch and the bytes it reads at
//! least (ring keys of the windows, representative keys of the scored blocks) with the
//! time those bytes take at 4.2 TB/s. `finalize` does work in one decode step of each
//! `block` (when a block leaves the window); at the default context it only checks.

#[path = "common/device.rs"]
mod device;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use spinkv::ops::{self, InfLlmGeometry, StepGraph};
use spinkv::partition::{InfLlmConfig, TokenRun};
use std::time::Instant;

/// Launches per graph (the 30 layers of SmolLM2).
const LAYERS: usize = 30;
/// HBM bandwidth of the floor column, bytes/s (the H200's low end).
const HBM: f64 = 4.2e12;

#[derive(Parser, Debug)]
#[command(about = "InfLLM's decode ops one by one (µs per launch)")]
struct Args {
    /// Run on CUDA device 0 (graph replays); else the CPU (eager).
    #[arg(long)]
    cuda: bool,
    /// Model shape: smollm2 (9/3 heads, D 64) or llama8b (32/8 heads, D 128).
    #[arg(long, default_value = "smollm2")]
    shape: String,
    /// Batch sizes (rows of one decode token each).
    #[arg(long, value_delimiter = ',', default_values_t = vec![16usize, 64])]
    batches: Vec<usize>,
    /// Tokens each row has before its decode token.
    #[arg(long, default_value_t = 8192)]
    context: usize,
    /// Token budget (`InfLlmConfig::for_budget`).
    #[arg(long, default_value_t = 1024)]
    budget: usize,
    /// Tokens per page.
    #[arg(long, default_value_t = 16)]
    page_size: usize,
    /// Graph replays (CUDA) or eager repetitions (CPU) per measurement.
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Also write the rows as CSV.
    #[arg(long)]
    csv: Option<std::path::PathBuf>,
}

/// (op, bytes it reads at least, one call of it).
type Case<'a> = (&'a str, f64, &'a dyn Fn() -> spinkv::Result<()>);

/// One decode step's inputs and InfLLM's state for B owners.
struct Step {
    geo: InfLlmGeometry,
    topk: usize,
    ring_k: Tensor,
    ring_m: Tensor,
    repr: Tensor,
    q: Tensor,
    k: Tensor,
    dst: Tensor,
    runs: Tensor,
    cand: Tensor,
}

fn build(a: &Args, b: usize, dev: &Device) -> Result<Step> {
    let (hq, hkv, d) = match a.shape.as_str() {
        "smollm2" => (9, 3, 64),
        "llama8b" => (32, 8, 128),
        s => anyhow::bail!("--shape {s}: expected smollm2 or llama8b"),
    };
    let cfg = InfLlmConfig::for_budget(a.budget);
    let p = a.page_size;
    anyhow::ensure!(
        cfg.block_tokens % p == 0,
        "block {} is not a multiple of page {p}",
        cfg.block_tokens
    );
    let geo = InfLlmGeometry {
        window: cfg.window_tokens,
        block: cfg.block_tokens,
        repr: cfg.repr_topk,
        page_size: p,
        sink_pages: cfg.sink_tokens.div_ceil(p),
        ring: cfg.window_tokens + cfg.block_tokens + 256,
    };
    let n = (a.context + 1).div_ceil(p);
    let slots = b * hkv * n;
    let rnd = |dims: &[usize]| -> Result<Tensor> { Ok(Tensor::randn(0f32, 1.0, dims, dev)?.to_dtype(DType::BF16)?) };
    // Slot of (row, head, page): distinct everywhere; the ring's slot plane holds its pages.
    let cand: Vec<u32> = (0..slots as u32).collect();
    let mut planes = vec![0u32; b * 4 * geo.ring * hkv];
    for o in 0..b {
        for e in 0..geo.ring {
            for h in 0..hkv {
                let tok = a.context - geo.ring + 1 + e;
                planes[((o * 4) * geo.ring + tok % geo.ring) * hkv + h] = ((o * hkv + h) * n + tok / p) as u32;
                planes[((o * 4 + 1) * geo.ring + e) * hkv + h] = 0.01f32.to_bits();
            }
        }
    }
    let dst: Vec<u32> = (0..b * hkv)
        .map(|i| ((i * n + a.context / p) * p + a.context % p) as u32)
        .collect();
    let runs: Vec<TokenRun> = (0..b)
        .map(|r| TokenRun {
            seq: r as u64,
            start: a.context,
            n: 1,
            row: r,
            owner: r as u32,
        })
        .collect();
    Ok(Step {
        topk: cfg.topk_blocks,
        ring_k: rnd(&[b, geo.ring, hkv, d])?,
        ring_m: Tensor::from_vec(planes, (b, 4, geo.ring, hkv), dev)?,
        repr: rnd(&[slots, geo.keys_per_page(), d])?,
        q: rnd(&[b, hq, d])?,
        k: rnd(&[b, hkv, d])?,
        dst: Tensor::from_vec(dst, (b, hkv), dev)?,
        runs: TokenRun::table(&runs, dev)?,
        cand: Tensor::from_vec(cand, (b, hkv, n), dev)?,
        geo,
    })
}

/// µs per call of `f`: graph replays of `LAYERS` calls on CUDA, eager calls on the CPU.
fn time(dev: &Device, reps: usize, f: &dyn Fn() -> spinkv::Result<()>) -> Result<f64> {
    if !StepGraph::supported(dev) {
        f()?;
        let t0 = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        return Ok(t0.elapsed().as_secs_f64() * 1e6 / reps as f64);
    }
    let all = || (0..LAYERS).try_for_each(|_| f());
    StepGraph::warm_up(dev, all)?;
    let (graph, ()) = StepGraph::capture(dev, all)?;
    graph.launch()?;
    dev.synchronize()?;
    let t0 = Instant::now();
    for _ in 0..reps {
        graph.launch()?;
    }
    dev.synchronize()?;
    Ok(t0.elapsed().as_secs_f64() * 1e6 / (reps * LAYERS) as f64)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let dev = device::device(a.cuda)?;
    let mut rows = Vec::new();
    for &b in &a.batches {
        let s = build(&a, b, &dev).with_context(|| format!("building B = {b}"))?;
        let (geo, d) = (s.geo, s.q.dim(2)?);
        let hkv = s.k.dim(1)?;
        let scale = 1.0 / (d as f32).sqrt();
        let scores = ops::infllm_block_scores(&s.q, &s.repr, &s.cand, &s.runs, &geo)?;
        let top = ops::topk_indices(&scores, s.topk)?;
        // Bytes read at least: the window's keys; each scored block's representatives.
        let window_bytes = (b * geo.window * hkv * d * 2) as f64;
        let blocks = geo.blocks_at(a.context);
        let score_bytes = (b * blocks * hkv * geo.repr * d * 2) as f64;
        let cases: [Case; 6] = [
            ("ring_write", 0.0, &|| {
                ops::infllm_ring_write(&s.ring_k, &s.ring_m, &s.k, &s.dst, &s.runs, geo.page_size)
            }),
            ("window_mass", window_bytes, &|| {
                ops::infllm_window_mass(&s.ring_m, &s.ring_k, &s.q, &s.runs, (geo.window, scale), 1)
            }),
            ("finalize", 0.0, &|| {
                ops::infllm_finalize(&s.repr, &s.ring_k, &s.ring_m, &s.runs, &geo, 1)
            }),
            ("block_scores", score_bytes, &|| {
                ops::infllm_block_scores(&s.q, &s.repr, &s.cand, &s.runs, &geo).map(|_| ())
            }),
            ("topk", 0.0, &|| ops::topk_indices(&scores, s.topk).map(|_| ())),
            ("pages", 0.0, &|| {
                ops::infllm_pages(&top, &s.runs, &geo, hkv).map(|_| ())
            }),
        ];
        let mut total = 0.0;
        for (name, bytes, f) in cases {
            let us = time(&dev, a.reps, f).with_context(|| format!("{name}, B = {b}"))?;
            total += us;
            rows.push((name.to_string(), b, us, bytes));
        }
        rows.push(("all six".to_string(), b, total, window_bytes + score_bytes));
    }
    let mut table = format!(
        "InfLLM decode ops · {} · context {} · budget {} · {:?}\n\n| op | B | µs per launch | bytes read (at least) | floor at 4.2 TB/s (µs) |\n|---|---:|---:|---:|---:|\n",
        a.shape,
        a.context,
        a.budget,
        dev.location()
    );
    let mut csv = String::from("op,batch,us,bytes,floor_us\n");
    for (name, b, us, bytes) in &rows {
        let floor = bytes / HBM * 1e6;
        table.push_str(&format!("| {name} | {b} | {us:.2} | {bytes:.0} | {floor:.2} |\n"));
        csv.push_str(&format!("{name},{b},{us:.3},{bytes:.0},{floor:.3}\n"));
    }
    print!("{table}");
    if let Some(path) = &a.csv {
        std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
