//! Trace-driven fast-tier simulation: hit rates of the bucketed LRU with dynamic
//! per-request budgets, with fixed equal budgets, without budgets, and of an exact LRU of
//! the same capacity, on synthetic workloads and on recorded selection traces.
//!
//! `cargo run --release --example cache_sim -- --fractions 0.05,0.1,0.25,0.5 [--traces a.csv,b.csv]`
//!
//! Traces are the CSVs of `generate --trace` or `passkey --trace-dir` (one request per
//! sequence in each file; all replayed concurrently).

use anyhow::{Context, Result};
use clap::Parser;
use spinkv::pool::BudgetPolicy;
use spinkv::sim::{self, synthetic, CachePolicy, RequestTrace};

#[derive(Parser, Debug)]
#[command(about = "Replay selection traces against fast-tier cache policies")]
struct Args {
    /// Fast-tier capacity as fractions of the requests' total KV pages.
    #[arg(long, value_delimiter = ',', default_value = "0.05,0.1,0.25,0.5")]
    fractions: Vec<f64>,
    /// Ways per bucket.
    #[arg(long, default_value_t = 8)]
    ways: usize,
    /// Steps over which the dynamic policy averages its reuse counts.
    #[arg(long, default_value_t = 16)]
    window_steps: u64,
    /// Largest reuse distance (steps) the dynamic policy counts.
    #[arg(long, default_value_t = 2)]
    reuse_steps: u64,
    /// Recorded selection traces (CSV).
    #[arg(long, value_delimiter = ',')]
    traces: Vec<std::path::PathBuf>,
    /// Synthetic requests per workload (0: none).
    #[arg(long, default_value_t = 8)]
    synthetic: usize,
    /// Seed of the synthetic workloads.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Also print each request's hit rate per policy.
    #[arg(long)]
    per_request: bool,
    /// Replay only layers >= this one from recorded traces (e.g. 2 to leave out Quest's
    /// dense first layers, which scan every page each step).
    #[arg(long, default_value_t = 0)]
    min_layer: u32,
    /// Also report how well the layer below's selection in the same step names the pages
    /// new to a layer's selection (the case for cross-layer prefetch; `spinkv::sim::predict`).
    #[arg(long)]
    predictors: bool,
}

fn table(label: &str, reqs: &[RequestTrace], args: &Args) {
    let kv = sim::total_kv_pages(reqs);
    let refs: usize = reqs
        .iter()
        .flat_map(|r| r.steps.iter().flatten().flat_map(|l| l.heads.iter()))
        .map(Vec::len)
        .sum();
    println!(
        "\n{label}: {} requests, {kv} KV pages, {refs} page requests",
        reqs.len()
    );
    println!(
        "{:>9} {:>9} | {:>14} {:>14} {:>14} {:>10}",
        "capacity", "pages", "bucket+dyn", "bucket+fixed", "bucket", "exact LRU"
    );
    let policies = [
        CachePolicy::Bucketed {
            ways: args.ways,
            budgets: BudgetPolicy::Dynamic {
                window_steps: args.window_steps,
                reuse_steps: args.reuse_steps,
                floor_pages: 8,
            },
        },
        CachePolicy::Bucketed {
            ways: args.ways,
            budgets: BudgetPolicy::FixedEqual,
        },
        CachePolicy::Bucketed {
            ways: args.ways,
            budgets: BudgetPolicy::Unlimited,
        },
        CachePolicy::ExactLru,
    ];
    if args.predictors {
        let p = sim::predictors(reqs);
        println!(
            "  new pages: {} of {} selected ({:.1}%); the layer below's selection in the same step names \
             {:.1}% of them fetching {:.2} pages per new page (same KV head), {:.1}% fetching {:.2} (all heads)",
            p.new,
            p.selected,
            100.0 * p.new as f64 / p.selected.max(1) as f64,
            100.0 * p.below_same_head.coverage(p.new),
            p.below_same_head.fetched_per_new(p.new),
            100.0 * p.below_all_heads.coverage(p.new),
            p.below_all_heads.fetched_per_new(p.new),
        );
    }
    for &f in &args.fractions {
        let cap = ((kv as f64 * f) as usize).max(args.ways);
        let reports: Vec<sim::SimReport> = policies.iter().map(|&p| sim::simulate(reqs, cap, p)).collect();
        let rates: Vec<f64> = reports.iter().map(sim::SimReport::hit_rate).collect();
        println!(
            "{:>8.0}% {:>9} | {:>13.1}% {:>13.1}% {:>13.1}% {:>9.1}%",
            f * 100.0,
            cap,
            rates[0] * 100.0,
            rates[1] * 100.0,
            rates[2] * 100.0,
            rates[3] * 100.0
        );
        if args.per_request {
            for (i, r) in reqs.iter().enumerate() {
                let rate = |rep: &sim::SimReport| {
                    let (_, h, m) = &rep.per_request[i];
                    100.0 * *h as f64 / (*h + *m).max(1) as f64
                };
                println!(
                    "{:>19} | {:>13.1}% {:>13.1}% {:>13.1}% {:>9.1}%  {}",
                    "",
                    rate(&reports[0]),
                    rate(&reports[1]),
                    rate(&reports[2]),
                    rate(&reports[3]),
                    r.name
                );
            }
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    println!(
        "hit rates (ways {}, dynamic window {} steps); capacity = fraction of all requests' KV pages",
        args.ways, args.window_steps
    );
    if args.synthetic > 0 {
        table(
            "synthetic mixed (focused 2% drift + scanning)",
            &synthetic::mixed_workload(args.synthetic, args.seed),
            &args,
        );
        table(
            "synthetic uniform (10% drift)",
            &synthetic::uniform_workload(args.synthetic, 0.1, args.seed),
            &args,
        );
    }
    if !args.traces.is_empty() {
        let mut reqs = Vec::new();
        for path in &args.traces {
            let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let mut recs = spinkv::trace::read_csv(std::io::BufReader::new(f))?;
            recs.retain(|r| r.layer >= args.min_layer);
            let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("trace");
            reqs.extend(sim::requests_from_records(name, &recs));
        }
        let label = format!("recorded traces (layers >= {})", args.min_layer);
        table(&label, &reqs, &args);
    }
    Ok(())
}
