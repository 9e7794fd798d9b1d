//! serve_bench's output: one row per configuration (CSV and markdown table) and the SVG
//! plots drawn from the rows.

use super::*;

/// One configuration's results (a CSV row, a table line).
pub(crate) struct Row {
    pub(crate) mode: &'static str,
    pub(crate) algo: String,
    /// Batch size, or number of requests.
    pub(crate) batch: usize,
    pub(crate) context: String,
    pub(crate) new_tokens: usize,
    pub(crate) decode_tps: f64,
    /// Decode tokens/s of the decode-only steps that carried every request of the run
    /// (the steady state at batch B, what the PyTorch anchor measures); offline only.
    pub(crate) full_batch_tps: f64,
    /// [`Self::full_batch_tps`] without the steps that warmed up or captured a graph.
    pub(crate) steady_tps: f64,
    pub(crate) output_tps: f64,
    pub(crate) req_s: f64,
    pub(crate) lat: LatencySummary,
    /// Bytes, and where they come from.
    pub(crate) mem: (u64, &'static str),
    pub(crate) accuracy: Option<f64>,
}

impl Row {
    /// A row from the completions and the engine's metrics; memory is the device peak
    /// when known, else the cache's configured bytes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
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

    pub(crate) const COLUMNS: &'static str =
        "mode,algo,batch_or_requests,context,new_tokens,decode_tok_s,full_batch_decode_tok_s,steady_decode_tok_s,\
        output_tok_s,req_s,\
        ttft_p50_ms,ttft_p99_ms,tpot_p50_ms,tpot_p99_ms,itl_p50_ms,itl_p99_ms,mem_gb,mem_source,accuracy";

    /// The values of the [`Self::COLUMNS`] (empty where not measured).
    pub(crate) fn cells(&self) -> Vec<String> {
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

/// Throughput against batch (offline rows) and the TTFT distribution (every row).
pub(crate) fn plots(dir: &Path, rows: &[Row], algos: &[String]) -> Result<()> {
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
