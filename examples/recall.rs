//! Oracle recall of the sparse algorithms' page selections on a real model (issue 17).
//!
//! `cargo run --release --example recall -- --contexts 1024,2048 --decode-steps 8`
//!
//! A dense cache leads a [`FanOut`]: the model runs on dense attention, and every sparse
//! cache (each algorithm at each budget) sees exactly the same queries, keys and values
//! (teacher forcing), so all selections are made on the same states. For each decode
//! step, layer and KV head, a page's *true mass* is the dense softmax weight of its keys,
//! summed over the group's query heads; an algorithm's *mass recall* is the share of the
//! total mass that its selected pages hold. *Top-10 recall* (the only figure the Quest
//! paper reports, Fig. 4) is the share of each query head's 10 highest-weight tokens that
//! lie in the selected pages. Prompt kinds: `haystack` (the passkey filler with a key at
//! half depth and its question), `prose` (this repository's docs) and `code` (its Rust
//! sources). Beside the algorithms, `oracle-pN` rows give the ceiling of any page
//! selection of the same budget: the pages of N tokens with the most true mass. Prints a table, writes one CSV row per (kind, context, algorithm, budget,
//! layer) and, with `--plot`, an SVG of recall against budget.

#[path = "common/plot.rs"]
mod plot;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use clap::Parser;
use spinkv::models::fetch::ModelSpec;
use spinkv::models::passkey::{build_prompt, KeyGen};
use spinkv::models::{load_model, LoadedModel};
use spinkv::partition::by_name;
use spinkv::rope::{apply_rope, rope_tables};
use spinkv::{FanOut, SelectionRecord, SparseKvCache, SpinCache};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

#[derive(Parser, Debug)]
#[command(about = "Oracle recall (attention mass covered) of each sparse algorithm's pages")]
struct Args {
    /// `default` (SmolLM2-135M-Instruct), a GGUF path or HF folder, or a Hub id.
    #[arg(long, default_value = "default")]
    model: String,
    /// Prompt lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096")]
    contexts: Vec<usize>,
    /// Prompt kinds: haystack, prose, code.
    #[arg(long, value_delimiter = ',', default_value = "haystack,prose,code")]
    kinds: Vec<String>,
    /// Sparse algorithms.
    #[arg(long, value_delimiter = ',', default_value = "quest,infllm,shadowkv,streaming")]
    algos: Vec<String>,
    /// Budgets as fractions of the prompt.
    #[arg(long, value_delimiter = ',', default_value = "0.0625,0.125,0.25")]
    budgets: Vec<f64>,
    /// Greedy decode steps measured after the prompt.
    #[arg(long, default_value_t = 8)]
    decode_steps: usize,
    /// Page size (algorithms with their own, like ShadowKV's 8-token chunks, use it).
    #[arg(long, default_value_t = 16)]
    page_size: usize,
    /// Page sizes of the oracle's ceiling rows (`oracle-pN`: at each budget, the
    /// ⌈budget / N⌉ pages of N tokens with the most true mass, on every layer; the most
    /// any page selection of that budget can cover). Empty: none.
    #[arg(long, value_delimiter = ',', default_value = "16,8")]
    oracle_pages: Vec<usize>,
    /// CSV output (one row per kind, context, algorithm, budget and layer).
    #[arg(long, default_value = "recall.csv")]
    csv: PathBuf,
    /// Write an SVG of mean mass recall against budget here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Only summarize (table and `--plot`) the rows of these earlier `--csv` files.
    #[arg(long, value_delimiter = ',')]
    from_csv: Vec<PathBuf>,
}

/// Text of the `prose` and `code` prompts (this repository's own files).
const PROSE: &[&str] = &[
    include_str!("../docs/ARCHITECTURE.md"),
    include_str!("../README.md"),
    include_str!("../docs/BENCHMARKS.md"),
];
const CODE: &[&str] = &[
    include_str!("../src/cache/attend.rs"),
    include_str!("../src/partition/infllm.rs"),
    include_str!("../src/partition/quest.rs"),
    include_str!("../src/partition/shadowkv/mod.rs"),
    include_str!("../src/partition/shadowkv/compress.rs"),
    include_str!("../src/engine/engine.rs"),
    include_str!("../src/ops/attention.rs"),
    include_str!("../src/tiered/host_tier.rs"),
];

fn prompt(lm: &LoadedModel, kind: &str, context: usize, keys: &mut KeyGen) -> Result<Vec<u32>> {
    let text = match kind {
        "haystack" => return Ok(build_prompt(&lm.tokenizer, context, 0.5, keys.next_key())?.0),
        "prose" => PROSE.concat(),
        "code" => CODE.concat(),
        k => bail!("unknown prompt kind {k:?} (haystack, prose, code)"),
    };
    let ids = lm
        .tokenizer
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?
        .get_ids()
        .to_vec();
    if ids.len() < context {
        bail!(
            "the {kind} text has {} tokens, fewer than the context {context}",
            ids.len()
        );
    }
    Ok(ids[..context].to_vec())
}

/// One summary cell: (algorithm, budget fraction) and the sums over runs of the
/// per-run mean mass recall and top-10 recall, with the number of runs.
type Cell = ((String, f64), (f64, f64, usize));

/// What the tap records: each layer's pre-RoPE keys of every step, and the decode
/// steps' queries (`queries[step][layer]`).
#[derive(Default)]
struct Recorded {
    keys: Vec<Vec<Tensor>>,
    queries: Vec<Vec<Tensor>>,
    decoding: bool,
}

/// Per (decode step, layer): `[Hkv, n]` token mass (summed over the group's query heads)
/// and, per query head, its 10 highest-weight tokens.
struct Oracle {
    mass: Vec<Vec<Vec<Vec<f32>>>>,
    top10: Vec<Vec<Vec<Vec<usize>>>>,
}

fn oracle(lm: &LoadedModel, rec: &Recorded, prompt_len: usize) -> Result<Oracle> {
    let c = lm.model.cache_config(prompt_len + 1, 1.0);
    let (hq, hkv, d) = (c.num_q_heads, c.num_kv_heads, c.head_dim);
    let g = hq / hkv;
    let scale = 1.0 / (d as f64).sqrt();
    let (mut mass, mut top10) = (Vec::new(), Vec::new());
    for (step, qs) in rec.queries.iter().enumerate() {
        let n = prompt_len + step + 1; // keys seen by the decode token, itself included
        let positions: Vec<u32> = (0..n as u32).collect();
        let (cos, sin) = rope_tables(&positions, d, c.rope_theta, DType::F32, &Device::Cpu)?;
        let (mut m_step, mut t_step) = (Vec::new(), Vec::new());
        for (layer, q) in qs.iter().enumerate() {
            let k = Tensor::cat(&rec.keys[layer], 0)?
                .narrow(0, 0, n)?
                .to_dtype(DType::F32)?;
            let k = apply_rope(&k.to_device(&Device::Cpu)?, &cos, &sin)?; // [n, Hkv, D]
            let q = q.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            let q = apply_rope(&q, &cos.narrow(0, n - 1, 1)?, &sin.narrow(0, n - 1, 1)?)?;
            let scores = (q.reshape((hkv, g, d))?.matmul(&k.permute((1, 2, 0))?.contiguous()?)? * scale)?;
            let w = candle_nn::ops::softmax_last_dim(&scores)?; // [Hkv, g, n]
            m_step.push(w.sum(1)?.to_vec2::<f32>()?);
            let w = w.reshape((hq, n))?.to_vec2::<f32>()?;
            let tops = w
                .iter()
                .map(|row| {
                    let mut idx: Vec<usize> = (0..n).collect();
                    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                    idx.truncate(10);
                    idx
                })
                .collect();
            t_step.push(tops);
        }
        mass.push(m_step);
        top10.push(t_step);
    }
    Ok(Oracle { mass, top10 })
}

/// Per-layer sums of (mass recall, top-10 recall, samples), averaged by `finish`.
struct LayerSums(Vec<LayerRecall>);

impl LayerSums {
    fn new(layers: usize) -> Self {
        Self(vec![(0.0, 0.0, 0); layers])
    }

    /// Adds one (step, layer, KV head) row: `row` is its per-token mass, `tops` the
    /// group's query heads' top-10 tokens, `in_sel` whether a token's page is selected.
    fn add(&mut self, layer: usize, row: &[f32], tops: &[Vec<usize>], in_sel: impl Fn(usize) -> bool) {
        let total: f64 = row.iter().map(|&x| x as f64).sum();
        let got: f64 = row
            .iter()
            .enumerate()
            .filter(|(i, _)| in_sel(*i))
            .map(|(_, &x)| x as f64)
            .sum();
        let hits = tops.iter().flatten().filter(|&&tok| in_sel(tok)).count();
        let n_top: usize = tops.iter().map(|x| x.len()).sum();
        let a = &mut self.0[layer];
        a.0 += got / total.max(1e-30);
        a.1 += hits as f64 / n_top.max(1) as f64;
        a.2 += 1;
    }

    fn finish(self) -> Vec<LayerRecall> {
        self.0
            .into_iter()
            .map(|(a, b, n)| (a / n.max(1) as f64, b / n.max(1) as f64, n))
            .collect()
    }
}

/// Mean (mass recall, top-10 recall) per layer of one cache's decode selections.
fn recall(o: &Oracle, trace: &[SelectionRecord], page: usize, g: usize, layers: usize) -> Vec<LayerRecall> {
    let mut acc = LayerSums::new(layers);
    for r in trace {
        // Step 1 is the prompt; decode step i is cache step i + 2.
        let Some(step) = (r.step as usize).checked_sub(2) else {
            continue;
        };
        let (l, h) = (r.layer as usize, r.kv_head as usize);
        let (Some(m), Some(t)) = (
            o.mass.get(step).and_then(|s| s.get(l)),
            o.top10.get(step).and_then(|s| s.get(l)),
        ) else {
            continue;
        };
        if l >= layers {
            continue;
        }
        let in_sel = |tok: usize| r.pages.binary_search(&((tok / page) as u32)).is_ok();
        acc.add(l, &m[h], &t[h * g..(h + 1) * g], in_sel);
    }
    acc.finish()
}

/// Mean (mass recall, top-10 recall) per layer of the best selection of `pages` pages of
/// `page` tokens: for every (decode step, layer, KV head), the pages with the most true
/// mass (the ceiling of any page selection of that size).
fn oracle_recall(o: &Oracle, page: usize, pages: usize, g: usize, layers: usize) -> Vec<LayerRecall> {
    let mut acc = LayerSums::new(layers);
    for (m_step, t_step) in o.mass.iter().zip(&o.top10) {
        for (l, (m, t)) in m_step.iter().zip(t_step).enumerate().take(layers) {
            for (h, row) in m.iter().enumerate() {
                let mut per_page = vec![0f64; row.len().div_ceil(page)];
                for (i, &x) in row.iter().enumerate() {
                    per_page[i / page] += x as f64;
                }
                let mut order: Vec<usize> = (0..per_page.len()).collect();
                order.sort_by(|&a, &b| per_page[b].total_cmp(&per_page[a]).then(a.cmp(&b)));
                let mut chosen = vec![false; per_page.len()];
                for &pg in order.iter().take(pages.max(1)) {
                    chosen[pg] = true;
                }
                acc.add(l, row, &t[h * g..(h + 1) * g], |tok| chosen[tok / page]);
            }
        }
    }
    acc.finish()
}

/// One measured configuration: (algorithm, budget fraction, budget tokens, page size).
type Config = (String, f64, usize, usize);

/// Per layer: (mean mass recall, mean top-10 recall, samples).
type LayerRecall = (f64, f64, usize);

/// One earlier run, (kind, context, algorithm, fraction), with its per-layer sums.
type RunSums = ((String, String, String, f64), (f64, f64, usize));

/// The summary cells of earlier CSV files (each run's per-layer rows averaged).
fn summary_of(paths: &[PathBuf]) -> Result<Vec<Cell>> {
    // (kind, context, algorithm, fraction) -> (mass sum, top-10 sum, layers)
    let mut runs: Vec<RunSums> = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p).with_context(|| p.display().to_string())?;
        for line in text.lines().skip(1).filter(|l| !l.is_empty()) {
            let f: Vec<&str> = line.split(',').collect();
            if f.len() < 10 {
                bail!("{}: not a recall CSV row: {line:?}", p.display());
            }
            let key = (
                f[0].to_string(),
                f[1].to_string(),
                f[2].to_string(),
                f[3].parse::<f64>()?,
            );
            let (m, t) = (f[7].parse::<f64>()?, f[8].parse::<f64>()?);
            match runs.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => {
                    v.0 += m;
                    v.1 += t;
                    v.2 += 1;
                }
                None => runs.push((key, (m, t, 1))),
            }
        }
    }
    let mut cells: Vec<Cell> = Vec::new();
    for ((_, _, algo, f), (m, t, n)) in runs {
        let (m, t) = (m / n as f64, t / n as f64);
        match cells.iter_mut().find(|(k, _)| k.0 == algo && k.1 == f) {
            Some((_, s)) => {
                s.0 += m;
                s.1 += t;
                s.2 += 1;
            }
            None => cells.push(((algo, f), (m, t, 1))),
        }
    }
    Ok(cells)
}

fn report(summary: &[Cell], algos: &[String], plot_path: Option<&PathBuf>) -> Result<()> {
    println!("| algorithm | budget | mass recall | top-10 recall |\n|---|---|---|---|");
    for ((algo, f), (m, t, n)) in summary {
        println!("| {algo} | {f} | {:.3} | {:.3} |", m / *n as f64, t / *n as f64);
    }
    if let Some(path) = plot_path {
        let mut names: Vec<String> = algos.to_vec();
        for ((a, _), _) in summary {
            if a.starts_with("oracle") && !names.contains(a) {
                names.push(a.clone());
            }
        }
        let series: Vec<(String, Vec<(f64, f64)>)> = names
            .iter()
            .map(|a| {
                let pts = summary
                    .iter()
                    .filter(|(k, _)| &k.0 == a)
                    .map(|((_, f), (m, _, n))| (*f, m / *n as f64))
                    .collect();
                (a.clone(), pts)
            })
            .collect();
        plot::plot(
            path,
            "mass recall against budget (SmolLM2, mean over layers)",
            ("budget (fraction of the prompt)", "attention mass covered"),
            &series,
            true,
        )?;
    }
    Ok(())
}

/// For every `quest-q8` configuration, how often its selection equals that of `quest` at
/// the same budget (issue 12: int8 page bounds against bounds in the KV dtype): the
/// share of selected pages the two have in common, and of (step, layer, head) rows
/// where the sets are equal. Rows where either selects every page are left out.
fn agreement(configs: &[Config], traces: &[Vec<SelectionRecord>], kind: &str, context: usize) {
    for (i, (algo, f, ..)) in configs.iter().enumerate() {
        let Some(j) = configs.iter().position(|c| c.0 == "quest" && c.1 == *f) else {
            continue;
        };
        if algo != "quest-q8" {
            continue;
        }
        let key = |r: &SelectionRecord| (r.step, r.layer, r.seq, r.kv_head);
        let base: std::collections::HashMap<_, _> = traces[j].iter().map(|r| (key(r), r)).collect();
        let (mut common, mut total, mut same, mut rows) = (0usize, 0usize, 0usize, 0usize);
        for r in &traces[i] {
            let Some(b) = base.get(&key(r)) else { continue };
            if r.pages.len() as u32 >= r.num_pages || b.pages.len() as u32 >= b.num_pages {
                continue;
            }
            let set: std::collections::HashSet<u32> = b.pages.iter().copied().collect();
            common += r.pages.iter().filter(|p| set.contains(p)).count();
            total += b.pages.len();
            same += usize::from(r.pages == b.pages);
            rows += 1;
        }
        eprintln!(
            "{kind:<8} ctx {context:>5} quest-q8 vs quest, budget {f:<6}: {:.4} of pages in common, identical sets in {same}/{rows} rows",
            common as f64 / total.max(1) as f64
        );
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !args.from_csv.is_empty() {
        return report(&summary_of(&args.from_csv)?, &args.algos, args.plot.as_ref());
    }
    let lm = load_model(&ModelSpec::parse(&args.model)?, DType::F32, &Device::Cpu, true)?;
    let layers = lm.model.cache_config(1, 1.0).num_layers;
    let g = {
        let c = lm.model.cache_config(1, 1.0);
        c.num_q_heads / c.num_kv_heads
    };
    let mut csv =
        std::io::BufWriter::new(std::fs::File::create(&args.csv).with_context(|| args.csv.display().to_string())?);
    writeln!(
        csv,
        "kind,context,algorithm,budget_fraction,budget_tokens,page_size,layer,mass_recall,top10_recall,samples"
    )?;
    if args.oracle_pages.contains(&0) {
        bail!("--oracle-pages: a page size must be at least 1");
    }
    let mut keys = KeyGen::new(1234);
    for kind in &args.kinds {
        for &context in &args.contexts {
            let ids = prompt(&lm, kind, context, &mut keys)?;
            let t0 = std::time::Instant::now();
            let mut configs = Vec::new();
            let mut caches = Vec::new();
            let total = ids.len() + args.decode_steps + 16;
            caches.push(SpinCache::new_boxed(
                lm.model.cache_config(total, 1.0).with_page_size(args.page_size),
                by_name("dense", 1)?,
            )?);
            for algo in &args.algos {
                for &f in &args.budgets {
                    let budget = ((ids.len() as f64 * f) as usize).max(4 * args.page_size);
                    let a = match by_name(algo, budget) {
                        Ok(a) => a,
                        Err(e) => {
                            eprintln!("skipping {algo} at budget {budget} tokens: {e}");
                            continue;
                        }
                    };
                    let page = a.page_size_hint().unwrap_or(args.page_size);
                    let mut c = SpinCache::new_boxed(lm.model.cache_config(total, 1.0).with_page_size(page), a)?;
                    c.set_trace(true);
                    caches.push(c);
                    configs.push((algo.clone(), f, budget, page));
                }
            }
            let rec = Mutex::new(Recorded {
                keys: vec![Vec::new(); layers],
                ..Default::default()
            });
            {
                let mut fan = FanOut::new(caches.iter_mut().map(|c| c as &mut dyn SparseKvCache).collect())?;
                fan.set_tap(Some(Box::new(|layer: usize, q: &Tensor, k: &Tensor, _v: &Tensor| {
                    let mut r = rec.lock().unwrap();
                    r.keys[layer].push(k.clone());
                    if r.decoding {
                        if layer == 0 {
                            r.queries.push(Vec::new());
                        }
                        if let Some(last) = r.queries.last_mut() {
                            last.push(q.clone());
                        }
                    }
                })));
                let seq = fan.add_sequence()?;
                let mut logits = lm.model.forward(&mut fan, &[(seq, &ids)])?;
                rec.lock().unwrap().decoding = true;
                for _ in 0..args.decode_steps {
                    let next = logits.get(0)?.argmax(D::Minus1)?.to_scalar::<u32>()?;
                    logits = lm.model.forward(&mut fan, &[(seq, &[next])])?;
                }
            }
            let o = oracle(&lm, &rec.lock().unwrap(), ids.len())?;
            let traces: Vec<Vec<SelectionRecord>> = caches.iter_mut().skip(1).map(|c| c.take_trace()).collect();
            agreement(&configs, &traces, kind, context);
            let mut rows: Vec<(Config, Vec<LayerRecall>)> = configs
                .iter()
                .zip(&traces)
                .map(|(c, trace)| (c.clone(), recall(&o, trace, c.3, g, layers)))
                .collect();
            for &page in &args.oracle_pages {
                for &f in &args.budgets {
                    let budget = ((ids.len() as f64 * f) as usize).max(4 * args.page_size);
                    let per_layer = oracle_recall(&o, page, budget.div_ceil(page), g, layers);
                    rows.push(((format!("oracle-p{page}"), f, budget, page), per_layer));
                }
            }
            for ((algo, f, budget, page), per_layer) in &rows {
                let (mut sm, mut st) = (0.0, 0.0);
                for (l, (m, t, n)) in per_layer.iter().enumerate() {
                    writeln!(csv, "{kind},{context},{algo},{f},{budget},{page},{l},{m:.5},{t:.5},{n}")?;
                    sm += m;
                    st += t;
                }
                let (m, t) = (sm / layers as f64, st / layers as f64);
                eprintln!(
                    "{kind:<8} ctx {context:>5} {algo:<9} budget {f:<6}: mass recall {m:.3}, top-10 recall {t:.3}"
                );
            }
            csv.flush()?;
            eprintln!("  ({kind}, {context}: {:.1} s)", t0.elapsed().as_secs_f64());
        }
    }
    println!(
        "\nmean over layers, decode steps, KV heads, {} kinds × {} contexts ({} decode steps each):\n",
        args.kinds.len(),
        args.contexts.len(),
        args.decode_steps
    );
    drop(csv);
    // The summary is read back from the rows just written: one path for it, as with
    // `--from-csv`.
    report(
        &summary_of(std::slice::from_ref(&args.csv))?,
        &args.algos,
        args.plot.as_ref(),
    )
}
