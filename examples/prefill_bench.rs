//! Prefill attention kernel alone on CUDA (`ops::prefill_attention`): causal attention of
//! a whole prompt in one chunk, and of the same prompt in chunks whose earlier tokens
//! are read through a page list, at the Llama-3.1-8B and SmolLM2 attention shapes
//! (bf16). Prints ms and TFLOP/s (causal FLOPs, 4·Hq·L²·D/2, the count PyTorch's anchor
//! uses) and, at 8K, the old path (`causal_self_attention`, f32 matmuls) for comparison.
//! `scripts/sdpa_prefill.py` times PyTorch's SDPA at the same points. The chunked runs
//! read the earlier tokens' K/V (the prompt's own, written into the pool) through a page
//! list; `--dirs N` lays the pages out as the cache does (see `Args::dirs`). Then ShadowKV's
//! factorization of one layer's prefill keys (`linalg::randomized_low_rank`, rank 160,
//! `[L, Hkv·D]`), the work its first decode step does per layer.
//!
//! `cargo run --release --features cuda --example prefill_bench [-- --csv FILE]`

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("prefill_bench needs the `cuda` feature: cargo run --release --features cuda --example prefill_bench");
}

#[cfg(feature = "cuda")]
fn main() -> anyhow::Result<()> {
    bench::main()
}

#[cfg(feature = "cuda")]
mod bench {
    use anyhow::Result;
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::{DType, Device, Tensor};
    use clap::Parser;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    use spinkv::linalg::{randomized_low_rank, LowRankOptions};
    use spinkv::ops::{self, PrefillChunk, PrefillTiles};
    use std::io::Write;

    #[derive(Parser)]
    struct Args {
        /// Write the rows as CSV here too.
        #[arg(long)]
        csv: Option<String>,
        /// Prompt lengths.
        #[arg(long, value_delimiter = ',', default_values_t = [8192usize, 32768])]
        lengths: Vec<usize>,
        /// Chunk length of the chunked runs.
        #[arg(long, default_value_t = 8192)]
        chunk: usize,
        /// Only time ShadowKV's factorization (skip the attention kernel).
        #[arg(long)]
        factor_only: bool,
        /// Skip ShadowKV's factorization.
        #[arg(long)]
        no_factor: bool,
        /// Where the prompt's pages live in the pool: 0 (default) puts each (KV head,
        /// page) in a shuffled slot of a pool of exactly those pages; N ≥ the KV heads
        /// lays them out as the cache allocates them, page-major over N directories
        /// (layers × KV heads: 256 for Llama-3.1-8B, 90 for SmolLM2), so that one head's
        /// consecutive pages are N slots apart, in a pool N / KV heads times larger.
        #[arg(long, default_value_t = 0)]
        dirs: usize,
        /// With `--dirs N`: lay the pages out as `PageLayout::ByDirectory` does instead,
        /// each head's pages one run of slots in logical order (slot = head · pages +
        /// page), in the same pool of N directories.
        #[arg(long, requires = "dirs")]
        by_directory: bool,
    }

    const P: usize = 16;

    /// Median over 7 repetitions of `f`'s device time, ms (after 2 warm-up calls).
    fn time(dev: &Device, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let Device::Cuda(c) = dev else {
            anyhow::bail!("not a CUDA device")
        };
        let stream = c.cuda_stream();
        f()?;
        f()?;
        stream.synchronize()?;
        let ctx = stream.context();
        let mut v = Vec::new();
        for _ in 0..7 {
            let e0 = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            let e1 = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            e0.record(&stream)?;
            f()?;
            e1.record(&stream)?;
            e1.synchronize()?;
            v.push(e0.elapsed_ms(&e1)? as f64);
        }
        v.sort_by(|a, b| a.total_cmp(b));
        Ok(v[v.len() / 2])
    }

    pub fn main() -> Result<()> {
        let args = Args::parse();
        let dev = Device::new_cuda(0)?;
        ops::preload_kernels(&dev)?;
        let mut r = StdRng::seed_from_u64(3);
        let mut rows: Vec<String> = Vec::new();
        println!("| shape | L | mode | ms | TFLOP/s |\n|---|---|---|---|---|");
        for (shape, hq, hkv, d) in [("llama3-8b", 32usize, 8usize, 128usize), ("smollm2-135m", 9, 3, 64)] {
            for &l in args.lengths.iter().filter(|_| !args.factor_only) {
                let scale = 1.0 / (d as f32).sqrt();
                let flops = 4.0 * hq as f64 * (l as f64) * (l as f64) * d as f64 / 2.0;
                let q = Tensor::randn(0f32, 1.0, (l, hq, d), &dev)?.to_dtype(DType::BF16)?;
                let k = Tensor::randn(0f32, 1.0, (l, hkv, d), &dev)?.to_dtype(DType::BF16)?;
                let v = Tensor::randn(0f32, 1.0, (l, hkv, d), &dev)?.to_dtype(DType::BF16)?;
                // The prompt's K/V also in pages, where the chunked runs read their
                // earlier tokens: (head, page) in a shuffled slot, or page-major over
                // `--dirs` directories as the cache allocates them (or by directory).
                let np = l.div_ceil(P);
                let dirs = args.dirs.max(hkv);
                let mut shuffled: Vec<u32> = (0..(hkv * np) as u32).collect();
                shuffled.shuffle(&mut r);
                let slot = |h: usize, lp: usize| -> u32 {
                    if args.dirs == 0 {
                        shuffled[h * np + lp]
                    } else if args.by_directory {
                        (h * np + lp) as u32
                    } else {
                        (lp * dirs + h) as u32
                    }
                };
                let nslots = if args.dirs == 0 { hkv * np } else { dirs * np };
                let pool = Tensor::zeros((nslots, 2, P, d), DType::BF16, &dev)?;
                let dst: Vec<u32> = (0..l)
                    .flat_map(|t| (0..hkv).map(move |h| (h, t)))
                    .map(|(h, t)| slot(h, t / P) * P as u32 + (t % P) as u32)
                    .collect();
                ops::paged_append(&pool, &k, &v, &Tensor::from_vec(dst, (l, hkv), &dev)?)?;
                let slot = &slot;
                let list: Vec<u32> = (0..hkv)
                    .flat_map(|h| (0..np).flat_map(move |lp| [slot(h, lp), lp as u32]))
                    .collect();
                let pages = Tensor::from_vec(list, (1, hkv, np, 2), &dev)?;
                let group = hq / hkv;
                let mut report = |mode: &str, ms: f64| {
                    let tf = flops / (ms * 1e9);
                    println!("| {shape} | {l} | {mode} | {ms:.3} | {tf:.1} |");
                    rows.push(format!("{shape},{l},\"{mode}\",{ms:.4},{tf:.2}"));
                };
                // Each kernel: wgmma (Hopper) where it runs, and mma.sync.
                use ops::PrefillPingPong::{Always, Never};
                for (kname, on, pp) in [
                    ("wgmma", true, Never),
                    ("wgmma ping-pong", true, Always),
                    ("mma.sync", false, Never),
                ] {
                    ops::set_prefill_wgmma(on);
                    ops::set_prefill_pingpong(pp);
                    // One chunk: the whole prompt, causal over itself.
                    let one = PrefillTiles::new(
                        &[PrefillChunk {
                            seq: 0,
                            row: 0,
                            start: 0,
                            n: l as u32,
                            list_len: 0,
                        }],
                        group,
                        P,
                        &dev,
                    )?;
                    let zero = Tensor::zeros(1, DType::U32, &dev)?;
                    let ms = time(&dev, &mut || {
                        ops::prefill_attention(&q, &k, &v, &pool, &pages, &zero, &one, scale)?;
                        Ok(())
                    })?;
                    report(&format!("one chunk, {kname}"), ms);
                    // Chunks of `chunk` tokens: each over its earlier pages, then itself.
                    if args.chunk < l {
                        let mut calls = Vec::new();
                        let mut start = 0;
                        while start < l {
                            let n = args.chunk.min(l - start);
                            let tiles = PrefillTiles::new(
                                &[PrefillChunk {
                                    seq: 0,
                                    row: 0,
                                    start: start as u32,
                                    n: n as u32,
                                    list_len: start.div_ceil(P) as u32,
                                }],
                                group,
                                P,
                                &dev,
                            )?;
                            let limit = Tensor::from_vec(vec![start as u32], 1, &dev)?;
                            let rows = |x: &Tensor| x.narrow(0, start, n).and_then(|x| x.contiguous());
                            calls.push((rows(&q)?, rows(&k)?, rows(&v)?, tiles, limit));
                            start += n;
                        }
                        let ms = time(&dev, &mut || {
                            for (q, k, v, tiles, limit) in &calls {
                                ops::prefill_attention(q, k, v, &pool, &pages, limit, tiles, scale)?;
                            }
                            Ok(())
                        })?;
                        report(&format!("chunks of {}, {kname}", args.chunk), ms);
                        // The chunks read their earlier tokens from the pool: they must
                        // give the one-chunk output (bf16 inputs, f32 outputs).
                        let whole = ops::prefill_attention(&q, &k, &v, &pool, &pages, &zero, &one, scale)?.out;
                        let parts = calls
                            .iter()
                            .map(|(q, k, v, tiles, limit)| {
                                Ok(ops::prefill_attention(q, k, v, &pool, &pages, limit, tiles, scale)?.out)
                            })
                            .collect::<Result<Vec<_>>>()?;
                        let diff = (Tensor::cat(&parts, 0)? - &whole)?
                            .abs()?
                            .max_all()?
                            .to_scalar::<f32>()?;
                        eprintln!("{shape} L={l} {kname}: chunked vs one chunk, max |Δout| = {diff:.2e}");
                        anyhow::ensure!(diff < 2e-2, "{shape} L={l} {kname}: chunked output off by {diff}");
                    }
                }
                ops::set_prefill_wgmma(true);
                ops::set_prefill_pingpong(ops::PrefillPingPong::Auto);
                if l <= 8192 {
                    let ms = time(&dev, &mut || {
                        ops::causal_self_attention(&q, &k, &v, scale)?;
                        Ok(())
                    })?;
                    report("old path (f32 matmuls)", ms);
                }
            }
        }
        // ShadowKV's low-rank factorization of one layer's keys (median of 3), on Gaussian
        // keys and on keys whose channels decay (scale 0.97^j: the spectrum spans ~1e3
        // over the rank, closer to real keys' wide dynamic range).
        println!("\n| shape | L | keys | ShadowKV factorization, one layer (ms) |\n|---|---|---|---|");
        let cases = [("llama3-8b", 8usize, 128usize), ("smollm2-135m", 3, 64)];
        for ((shape, hkv, d), decay) in cases
            .iter()
            .filter(|_| !args.no_factor)
            .flat_map(|c| [(*c, false), (*c, true)])
        {
            for l in [8192usize, 32768, 131072] {
                let mut x = Tensor::randn(0f32, 1.0, (l, hkv * d), &dev)?;
                if decay {
                    let s: Vec<f32> = (0..hkv * d).map(|j| 0.97f32.powi(j as i32)).collect();
                    x = x.broadcast_mul(&Tensor::from_vec(s, hkv * d, &dev)?)?;
                }
                let keys = if decay { "decaying" } else { "gaussian" };
                let mut v = Vec::new();
                for _ in 0..3 {
                    let t0 = std::time::Instant::now();
                    let lr = randomized_low_rank(&x, 160, LowRankOptions::default())?;
                    lr.left.sum_all()?.to_scalar::<f32>()?;
                    v.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                v.sort_by(|a, b| a.total_cmp(b));
                println!("| {shape} | {l} | {keys} | {:.1} |", v[1]);
                rows.push(format!("{shape},{l},shadowkv factorization ({keys}),{:.4},", v[1]));
            }
        }
        if let Some(path) = args.csv {
            let mut f = std::fs::File::create(path)?;
            writeln!(f, "shape,L,mode,ms,tflops")?;
            for row in rows {
                writeln!(f, "{row}")?;
            }
        }
        Ok(())
    }
}
