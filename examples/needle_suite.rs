//! The needle suite (issue 17): needles of four kinds (numbers, words, UUID-like codes,
//! and three city/number needles of which one is asked) hidden at spread depths of
//! prompts of several lengths, answered through the serving engine in batches, by every
//! algorithm at budgets that are fractions of the context.
//!
//! CPU smoke run: `cargo run --release --example needle_suite -- --contexts 512 --depths 0.5 --algos dense,quest`
//!
//! On a GPU: `cargo run --release --features cuda --example needle_suite -- --cuda
//! --contexts 1024,2048,4096,8192 --csv needles.csv --plot-dir docs/plots`.
//!
//! A cell is (algorithm, budget, context); its trials are every kind at every depth,
//! `--trials` times (20 per cell by default), the same prompts for every algorithm.
//! Dense runs once per context (budget "full"). Output: one CSV row per trial, a table of
//! accuracy with 95% Wilson intervals per cell and per kind, and one SVG per budget of
//! accuracy against context. `--from-csv` redraws the table and plots from a CSV.

#[path = "common/device.rs"]
mod device;
#[path = "common/plot.rs"]
mod plot;

use anyhow::{bail, ensure, Context, Result};
use candle_core::DType;
use clap::builder::PossibleValuesParser;
use clap::Parser;
use spinkv::engine::{DecodeMode, Engine, EngineConfig, FinishReason, Request};
use spinkv::models::fetch::ModelSpec;
use spinkv::models::needle::{build_needle, needle_found, wilson_interval, Needle, NeedleKind, NeedleRng};
use spinkv::models::{load_model, LoadedModel};
use spinkv::partition::{by_name, ALGORITHMS, VARIANTS};
use spinkv::SpinCache;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Needle-in-a-haystack suite of every algorithm, run through the serving engine")]
struct Args {
    /// `default` (SmolLM2-135M-Instruct), a GGUF path or HF folder, or a Hub id.
    #[arg(long, default_value = "default")]
    model: String,
    /// Run on the GPU (needs a build with `--features cuda`; f16 there, f32 on the CPU).
    #[arg(long)]
    cuda: bool,
    /// Total tokens per request (prompt plus `--new-tokens`).
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096,8192")]
    contexts: Vec<usize>,
    /// Needle kinds: number, word, uuid, multikey.
    #[arg(long, value_delimiter = ',', default_value = "number,word,uuid,multikey",
          value_parser = PossibleValuesParser::new(["number", "word", "uuid", "multikey"]))]
    kinds: Vec<String>,
    /// Depths of the asked needle, in [0, 1].
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,0.75,1")]
    depths: Vec<f64>,
    /// Trials per (kind, depth) in each cell.
    #[arg(long, default_value_t = 1)]
    trials: usize,
    /// Algorithms (dense runs once per context), and variants such as `quest-softmax`.
    #[arg(long, value_delimiter = ',', default_value = "dense,quest,infllm,shadowkv,streaming",
          value_parser = PossibleValuesParser::new(ALGORITHMS.iter().chain(VARIANTS)))]
    algos: Vec<String>,
    /// Budgets of the sparse algorithms, as fractions of the context.
    #[arg(long, value_delimiter = ',', default_value = "0.0625,0.125,0.25")]
    budgets: Vec<f64>,
    /// Tokens generated per answer (greedy; a newline ends the answer earlier).
    #[arg(long, default_value_t = 16)]
    new_tokens: usize,
    /// Prompt tokens per engine step (the chunked-prefill budget).
    #[arg(long, default_value_t = 8192)]
    max_prefill_tokens: usize,
    /// Most requests in one engine run (the rest of a cell waits for a free slot).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// `eager` turns CUDA graphs off (default: the engine's `auto`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "eager"])]
    decode: String,
    /// Seed of the prompts.
    #[arg(long, default_value_t = 17)]
    seed: u64,
    /// One CSV row per trial.
    #[arg(long, default_value = "needles.csv")]
    csv: PathBuf,
    /// Write one SVG per budget (accuracy against context) into this folder.
    #[arg(long)]
    plot_dir: Option<PathBuf>,
    /// Read the trials from this CSV instead of running (table and plots only).
    #[arg(long)]
    from_csv: Option<PathBuf>,
}

/// One answered prompt.
#[derive(Debug, Clone)]
struct Trial {
    algo: String,
    /// The budget as a fraction of the context; 1 for dense.
    budget: f64,
    context: usize,
    kind: String,
    depth: f64,
    answer: String,
    output: String,
    correct: bool,
}

const COLUMNS: &str = "algo,budget,context,kind,depth,answer,output,correct";

impl Trial {
    fn csv(&self) -> String {
        let output = self.output.replace(['"', '\n', '\r', ','], " ");
        let (a, b, c, k, d, ans) = (
            &self.algo,
            self.budget,
            self.context,
            &self.kind,
            self.depth,
            &self.answer,
        );
        format!("{a},{b},{c},{k},{d},{ans},\"{output}\",{}", self.correct as u8)
    }

    fn parse(line: &str) -> Result<Self> {
        let (head, rest) = line.split_once(",\"").context("no quoted output")?;
        let (output, correct) = rest.rsplit_once("\",").context("no correct column")?;
        let f: Vec<&str> = head.split(',').collect();
        ensure!(f.len() == 6, "expected {COLUMNS}");
        Ok(Self {
            algo: f[0].into(),
            budget: f[1].parse()?,
            context: f[2].parse()?,
            kind: f[3].into(),
            depth: f[4].parse()?,
            answer: f[5].into(),
            output: output.into(),
            correct: correct.trim() == "1",
        })
    }
}

/// The prompts of one context: every kind at every depth, `trials` times.
fn prompts(lm: &LoadedModel, a: &Args, context: usize) -> Result<Vec<Needle>> {
    ensure!(
        context > a.new_tokens,
        "context {context} must exceed --new-tokens {}",
        a.new_tokens
    );
    let mut rng = NeedleRng::new(a.seed ^ (context as u64).rotate_left(32));
    let mut out = Vec::new();
    for kind in &a.kinds {
        let kind = NeedleKind::parse(kind).context("unknown kind")?;
        for &depth in &a.depths {
            for _ in 0..a.trials {
                out.push(build_needle(
                    &lm.tokenizer,
                    kind,
                    context - a.new_tokens,
                    depth,
                    &mut rng,
                )?);
            }
        }
    }
    Ok(out)
}

/// Answers `needles` with `algo` at `budget` (fraction of `context`) through one engine.
fn run_cell(
    lm: &LoadedModel,
    a: &Args,
    algo: &str,
    budget: f64,
    context: usize,
    needles: &[Needle],
) -> Result<Vec<Trial>> {
    let tokens = ((budget * context as f64).round() as usize).max(1);
    let alg = by_name(algo, tokens).with_context(|| format!("{algo} at budget {tokens}"))?;
    let page = alg.page_size_hint().unwrap_or(16);
    let seqs = needles.len().min(a.batch).max(1);
    let cc = lm
        .model
        .cache_config_for(seqs, context, page, 1.0)
        .context("the cache's size overflows")?;
    let cache = SpinCache::new_boxed(cc, alg)?;
    let cfg = EngineConfig {
        max_running: seqs,
        max_prefill_tokens: a.max_prefill_tokens,
        eos_token_ids: lm.info.eos.clone(),
        decode_mode: if a.decode == "eager" {
            DecodeMode::Eager
        } else {
            DecodeMode::Auto
        },
        ..EngineConfig::default()
    };
    let mut eng = Engine::new(lm.model.clone(), Box::new(cache), Some(lm.tokenizer.clone()), cfg)?;
    let t0 = Instant::now();
    let handles = needles
        .iter()
        .map(|n| eng.submit(Request::tokens(n.ids.clone(), a.new_tokens).with_stop_strings(["\n"])))
        .collect::<spinkv::Result<Vec<_>>>()?;
    while eng.has_work() {
        eng.step()?;
    }
    let mut out = Vec::with_capacity(needles.len());
    for (h, n) in handles.into_iter().zip(needles) {
        let c = h.wait();
        if let FinishReason::Error(e) = &c.finish_reason {
            bail!("{algo} at {context}: a request failed: {e}");
        }
        out.push(Trial {
            algo: algo.into(),
            budget,
            context,
            kind: n.kind.name().into(),
            depth: n.depth,
            answer: n.answer.clone(),
            correct: needle_found(&c.text, &n.answer),
            output: c.text.trim().to_string(),
        });
    }
    let right = out.iter().filter(|t| t.correct).count();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "  {algo:<9} budget {budget:<6} context {context:>5}: {right}/{} in {secs:.1}s",
        out.len()
    );
    Ok(out)
}

/// Runs every cell, appending each cell's trials to `csv` as soon as it is done (so a
/// run cut short keeps what it finished).
fn run(a: &Args, csv: &mut impl Write) -> Result<Vec<Trial>> {
    let device = device::device(a.cuda)?;
    let dtype = if a.cuda { DType::F16 } else { DType::F32 };
    let lm = load_model(&ModelSpec::parse(&a.model)?, dtype, &device, true)?;
    eprintln!("model: {} ({dtype:?} on {:?})", lm.source, device.location());
    let mut trials = Vec::new();
    for &context in &a.contexts {
        let needles = prompts(&lm, a, context)?;
        eprintln!("context {context}: {} prompts", needles.len());
        for algo in &a.algos {
            let budgets: &[f64] = if algo == "dense" { &[1.0] } else { &a.budgets };
            for &b in budgets {
                let cell = run_cell(&lm, a, algo, b, context, &needles)?;
                for t in &cell {
                    writeln!(csv, "{}", t.csv())?;
                }
                csv.flush()?;
                trials.extend(cell);
            }
        }
    }
    Ok(trials)
}

/// Where `algo` goes in tables and legends: the algorithms' order, then the variants.
fn order(algo: &str) -> usize {
    ALGORITHMS
        .iter()
        .chain(VARIANTS)
        .position(|a| *a == algo)
        .unwrap_or(usize::MAX)
}

/// `k/n` and the 95% Wilson interval, as `acc [lo, hi] (k/n)` in percent (`—`: no trials).
fn cell(trials: &[&Trial]) -> String {
    let (k, n) = (trials.iter().filter(|t| t.correct).count(), trials.len());
    if n == 0 {
        return "—".into();
    }
    let (lo, hi) = wilson_interval(k, n, 1.96);
    let pct = |x: f64| (100.0 * x).round();
    format!(
        "{} [{}, {}] ({k}/{n})",
        pct(k as f64 / n.max(1) as f64),
        pct(lo),
        pct(hi)
    )
}

fn budget_label(b: f64) -> String {
    if b >= 1.0 {
        "full".into()
    } else {
        format!("1/{}", (1.0 / b).round())
    }
}

/// The tables: accuracy per (algorithm, budget) × context, and × kind (contexts pooled).
fn summary(trials: &[Trial]) {
    let mut contexts: Vec<usize> = trials.iter().map(|t| t.context).collect();
    contexts.sort_unstable();
    contexts.dedup();
    let mut groups: BTreeMap<(usize, String, u64), Vec<&Trial>> = BTreeMap::new();
    for t in trials {
        let key = (order(&t.algo), t.algo.clone(), (1e6 * t.budget) as u64);
        groups.entry(key).or_default().push(t);
    }
    println!("\naccuracy % [95% Wilson interval] (right/trials)");
    let cols: Vec<String> = contexts.iter().map(|c| c.to_string()).collect();
    table(&groups, &cols, |t, c| t.context.to_string() == c);
    println!("\nby kind, all contexts pooled");
    let kinds = ["number", "word", "uuid", "multikey"].map(String::from);
    table(&groups, &kinds, |t, k| t.kind == k);
}

/// One markdown table: a row per (algorithm, budget) group, a column per `cols` entry,
/// each cell over the group's trials that `in_col` puts in that column.
fn table(groups: &BTreeMap<(usize, String, u64), Vec<&Trial>>, cols: &[String], in_col: impl Fn(&Trial, &str) -> bool) {
    println!("\n| algorithm | budget | {} |", cols.join(" | "));
    println!("|---|---|{}", "---|".repeat(cols.len()));
    for ((_, algo, b), ts) in groups {
        let cells: Vec<String> = cols
            .iter()
            .map(|c| cell(&ts.iter().copied().filter(|t| in_col(t, c)).collect::<Vec<_>>()))
            .collect();
        println!("| {algo} | {} | {} |", budget_label(*b as f64 / 1e6), cells.join(" | "));
    }
}

/// One SVG per sparse budget: accuracy against context, dense and every algorithm.
fn plots(dir: &Path, trials: &[Trial]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("--plot-dir {}", dir.display()))?;
    let mut budgets: Vec<f64> = trials.iter().map(|t| t.budget).filter(|&b| b < 1.0).collect();
    budgets.sort_by(f64::total_cmp);
    budgets.dedup();
    for b in budgets {
        let mut series: BTreeMap<(usize, String), BTreeMap<usize, (usize, usize)>> = BTreeMap::new();
        for t in trials.iter().filter(|t| t.budget == b || t.algo == "dense") {
            let key = (order(&t.algo), t.algo.clone());
            let e = series.entry(key).or_default().entry(t.context).or_default();
            *e = (e.0 + t.correct as usize, e.1 + 1);
        }
        let series: Vec<(String, Vec<(f64, f64)>)> = series
            .into_iter()
            .map(|((_, algo), pts)| {
                let pts = pts
                    .into_iter()
                    .map(|(c, (k, n))| (c as f64, 100.0 * k as f64 / n as f64));
                (algo, pts.collect())
            })
            .collect();
        let name = format!("needle_accuracy_budget_{}.svg", (1.0 / b).round());
        let title = format!("needle suite: accuracy against context, budget {}", budget_label(b));
        plot::plot(
            &dir.join(name),
            &title,
            ("context (tokens)", "accuracy (%)"),
            &series,
            true,
        )?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    ensure!(
        a.trials >= 1 && !a.depths.is_empty(),
        "need at least one trial and one depth"
    );
    ensure!(
        a.budgets.iter().all(|b| *b > 0.0 && *b < 1.0),
        "--budgets are fractions in (0, 1), got {:?}",
        a.budgets
    );
    let trials = if let Some(path) = &a.from_csv {
        let text = std::fs::read_to_string(path).with_context(|| format!("--from-csv {}", path.display()))?;
        let lines = text.lines().skip(1).filter(|l| !l.is_empty());
        lines
            .enumerate()
            .map(|(i, l)| Trial::parse(l).with_context(|| format!("{}: row {}", path.display(), i + 1)))
            .collect::<Result<Vec<_>>>()?
    } else {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&a.csv).with_context(|| format!("--csv {}", a.csv.display()))?,
        );
        writeln!(f, "{COLUMNS}")?;
        let trials = run(&a, &mut f)?;
        eprintln!("CSV: {}", a.csv.display());
        trials
    };
    summary(&trials);
    if let Some(dir) = &a.plot_dir {
        plots(dir, &trials)?;
    }
    Ok(())
}
