//! Passkey retrieval (needle in a haystack) with a real model, per algorithm and budget.
//!
//! `cargo run --release --example passkey -- --contexts 1024,2048,4096 --trials 2`
//!
//! A random 5-digit key is hidden at depths 10–90% of filler text. The haystack is
//! prefilled (dense, as every algorithm here prefills); the question at the end is fed
//! token by token as decode steps, so the sparse selection decides what the answer can
//! see. Prints an accuracy table and writes every trial as CSV.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use spinkv::models::fetch::ModelSpec;
use spinkv::models::generation::prefill;
use spinkv::models::passkey::{build_prompt, is_correct, KeyGen};
use spinkv::models::{load_model, LoadedModel, Sampler, SamplingConfig};
use spinkv::partition::by_name;
use spinkv::{FanOut, SparseKvCache, SpinCache};
use std::io::Write;

#[derive(Parser, Debug)]
#[command(about = "Passkey retrieval accuracy per sparse algorithm and budget")]
struct Args {
    /// `default` (SmolLM2-135M-Instruct), a GGUF path or HF folder, or a Hub id.
    #[arg(long, default_value = "default")]
    model: String,
    /// Context lengths in tokens (approximate: filler is cut to fit).
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096,8192")]
    contexts: Vec<usize>,
    /// Depths of the key as fractions of the haystack.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.3,0.5,0.7,0.9")]
    depths: Vec<f64>,
    /// Trials per (context, depth) cell, each with a fresh random key.
    #[arg(long, default_value_t = 2)]
    trials: usize,
    /// Algorithms to compare.
    #[arg(long, value_delimiter = ',', default_value = "dense,quest,infllm,shadowkv,streaming")]
    algos: Vec<String>,
    /// Budgets as fractions of the context (sparse algorithms only).
    #[arg(long, value_delimiter = ',', default_value = "0.125")]
    budget_fractions: Vec<f64>,
    /// Page size (algorithms that need their own, like shadowkv's 8-token chunks, use it).
    #[arg(long, default_value_t = 16)]
    page_size: usize,
    /// CSV output.
    #[arg(long, default_value = "passkey.csv")]
    csv: std::path::PathBuf,
    /// Random seed for the keys.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Run on the GPU (needs `--features cuda`).
    #[arg(long)]
    cuda: bool,
    /// Write each sparse algorithm's decode selections of every trial as a CSV trace
    /// (`{algo}_ctx{context}_d{depth}_t{trial}.csv`) into this folder, for `cache_sim`.
    #[arg(long)]
    trace_dir: Option<std::path::PathBuf>,
}

/// Feeds the same steps to several caches. Every algorithm here prefills densely, so the
/// haystack is run through the model once and stored in all caches; attention outputs are
/// taken from the first cache (the others compute the same dense prefill). A `SeqId`
/// belongs to the cache that issued it: the fan-out hands out the first cache's id and
/// maps it to each cache's own (`ids`).
fn run_trial(
    lm: &LoadedModel,
    configs: &[(String, usize)],
    page: usize,
    prompt: &[u32],
    tail: usize,
    trace: Option<&dyn Fn(&str) -> std::path::PathBuf>,
) -> Result<Vec<String>> {
    let mut caches = Vec::new();
    for (algo, budget) in configs {
        let algo = by_name(algo, *budget)?;
        let page = algo.page_size_hint().unwrap_or(page);
        let ccfg = lm.model.cache_config(prompt.len() + 16, 1.0).with_page_size(page);
        caches.push(SpinCache::new_boxed(ccfg, algo)?);
    }
    let (head, question) = prompt.split_at(prompt.len() - tail);
    let seqs = {
        let mut fan = FanOut::new(caches.iter_mut().map(|c| c as &mut dyn SparseKvCache).collect())?;
        let seq = fan.add_sequence()?;
        prefill(&lm.model, &mut fan, seq, head, 1024, false)?;
        fan.ids(seq)?.to_vec()
    };
    let mut answers = Vec::with_capacity(caches.len());
    for ((c, (algo, _)), seq) in caches.iter_mut().zip(configs).zip(seqs) {
        let tracing = trace.is_some() && algo != "dense";
        c.set_trace(tracing);
        answers.push(answer(lm, c, seq, question)?);
        if let (true, Some(path)) = (tracing, trace) {
            let path = path(algo);
            let f = std::io::BufWriter::new(std::fs::File::create(&path)?);
            spinkv::trace::write_csv(f, &c.take_trace())?;
        }
    }
    Ok(answers)
}

/// Feeds the question token by token (sparse decode steps), then decodes 8 tokens greedily.
fn answer(lm: &LoadedModel, cache: &mut SpinCache, seq: spinkv::SeqId, question: &[u32]) -> Result<String> {
    let mut logits = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
    for &t in question {
        logits = lm.model.forward(cache, &[(seq, &[t])])?;
    }
    let mut sampler = Sampler::new(SamplingConfig::default());
    let mut out = Vec::new();
    for _ in 0..8 {
        let next = sampler.sample(&logits.get(0)?)?;
        if lm.info.eos.contains(&next) {
            break;
        }
        out.push(next);
        logits = lm.model.forward(cache, &[(seq, &[next])])?;
    }
    lm.tokenizer.decode(&out, true).map_err(|e| anyhow::anyhow!("{e}"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = if args.cuda {
        Device::new_cuda(0).context("--cuda needs a GPU and --features cuda")?
    } else {
        Device::Cpu
    };
    // f16 on the GPU: the dtype of the H200 passkey runs in docs/BENCHMARKS.md.
    let dtype = if args.cuda { DType::F16 } else { DType::F32 };
    let lm = load_model(&ModelSpec::parse(&args.model)?, dtype, &device, true)?;
    let mut csv = std::io::BufWriter::new(std::fs::File::create(&args.csv)?);
    writeln!(
        csv,
        "algorithm,budget,context,prompt_tokens,depth,trial,key,answer,correct"
    )?;
    let mut keys = KeyGen::new(args.seed);
    // (label, context) -> (correct, total)
    let mut cells: Vec<(String, usize, usize, usize)> = Vec::new();
    let mut configs: Vec<(String, f64)> = Vec::new();
    for a in &args.algos {
        if a == "dense" {
            configs.push((a.clone(), 1.0));
        } else {
            for &f in &args.budget_fractions {
                configs.push((a.clone(), f));
            }
        }
    }
    for &context in &args.contexts {
        for &depth in &args.depths {
            for trial in 0..args.trials {
                let key = keys.next_key();
                let (prompt, tail) = build_prompt(&lm.tokenizer, context, depth, key)?;
                let budgets: Vec<(String, usize)> = configs
                    .iter()
                    .map(|(algo, frac)| {
                        let budget = if algo == "dense" {
                            prompt.len()
                        } else {
                            ((context as f64 * frac) as usize).max(4 * args.page_size)
                        };
                        (algo.clone(), budget)
                    })
                    .collect();
                let t0 = std::time::Instant::now();
                if let Some(dir) = &args.trace_dir {
                    std::fs::create_dir_all(dir)?;
                }
                let trace_path = |algo: &str| -> std::path::PathBuf {
                    let dir = args.trace_dir.as_deref().unwrap_or(std::path::Path::new("."));
                    dir.join(format!("{algo}_ctx{context}_d{depth}_t{trial}.csv"))
                };
                let answers = run_trial(
                    &lm,
                    &budgets,
                    args.page_size,
                    &prompt,
                    tail,
                    args.trace_dir
                        .as_ref()
                        .map(|_| &trace_path as &dyn Fn(&str) -> std::path::PathBuf),
                )?;
                for (((algo, frac), (_, budget)), answer) in configs.iter().zip(&budgets).zip(answers) {
                    let correct = is_correct(&answer, key);
                    let label = if algo == "dense" {
                        "dense".to_string()
                    } else {
                        format!("{algo} (budget {frac}×ctx)")
                    };
                    eprintln!(
                        "{label:<32} ctx {context:>5} depth {depth:.1} trial {trial}: key {key} → {:?} {} ({:.1}s)",
                        answer.trim(),
                        if correct { "✓" } else { "✗" },
                        t0.elapsed().as_secs_f64()
                    );
                    writeln!(
                        csv,
                        "{algo},{budget},{context},{},{depth},{trial},{key},\"{}\",{}",
                        prompt.len(),
                        answer.trim().replace('"', "'"),
                        correct as u8
                    )?;
                    csv.flush()?;
                    match cells.iter_mut().find(|c| c.0 == label && c.1 == context) {
                        Some(c) => {
                            c.2 += correct as usize;
                            c.3 += 1;
                        }
                        None => cells.push((label, context, correct as usize, 1)),
                    }
                }
            }
        }
    }
    println!(
        "\npasskey accuracy ({} depths × {} trials per cell; model {})",
        args.depths.len(),
        args.trials,
        lm.source
    );
    print!("{:<32}", "algorithm");
    for c in &args.contexts {
        print!(" {:>8}", c);
    }
    println!();
    let mut labels: Vec<String> = Vec::new();
    for c in &cells {
        if !labels.contains(&c.0) {
            labels.push(c.0.clone());
        }
    }
    for l in labels {
        print!("{l:<32}");
        for &c in &args.contexts {
            match cells.iter().find(|x| x.0 == l && x.1 == c) {
                Some(x) => print!(" {:>7.0}%", 100.0 * x.2 as f64 / x.3 as f64),
                None => print!(" {:>8}", "-"),
            }
        }
        println!();
    }
    println!("CSV: {}", args.csv.display());
    Ok(())
}
