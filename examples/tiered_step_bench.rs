//! Per-step breakdown of a tiered Quest decode step for one layer at the Llama-3.1-8B
//! layer shape (32 query heads, 8 KV heads, head_dim 128, bf16, page 16, budget 2048
//! tokens = 128 pages per KV head): score → select → resolve → fetch → attend, with the
//! KV's home in mapped pinned host memory and an HBM tier holding 5–50% of it, against
//! the same step with all of the KV in HBM (same kernels, same selections) in the same
//! run. Two layouts of the HBM share: `cache` (every page's home is the host, HBM caches
//! them) and, for shares above 10%, `homes` (part of the pages have their home in HBM,
//! `DeviceLru::with_fast_homes`, and a cache of 10% of the rest takes the remainder:
//! `CacheConfig::with_fast_homes(h, 0.1)` with `h + 0.1·(1 − h)` = the share). In the
//! `homes` layout the first sequences' pages are homed in HBM, as allocation order gives.
//! Each layout runs in order (resolve → fetch → attend) and overlapped (`overlap`: the
//! misses are copied on a side stream, `ops::SideStream`, while the pages resident before
//! the round are attended; the fetched pages are attended after the join and merged, as
//! `SpinCache` does with `CacheConfig::overlap_fetch`). Overlapped rows time fetch and
//! attend as one phase (in the attend column). `--side-blocks 16,32,64` runs each
//! overlapped layout once per most-blocks value of the side stream's copy
//! (`ops::set_side_copy_blocks`; default: the library's default).
//!
//! `cargo run --release --features cuda --example tiered_step_bench [-- --quick] [-- --csv FILE] [-- --side-blocks LIST]`
//!
//! `--trace FILE [--trace-layer N]` replays a selection trace recorded through the engine
//! (`serve_bench --trace-dir`, CSV as `spinkv::trace` writes it) instead of the drifting
//! query: the recorded pages of layer N (default: the middle layer) of every (request,
//! KV head), 8 of them per sequence of this shape (B = rows / 8, L = the largest page
//! count × 16, the budget = the largest selection), the 50 consecutive steps with the
//! most selections (the fullest batch) in order. Scoring
//! and top-k still run (their results are dropped), so every phase keeps its cost.
//!
//! Workload: B sequences of L tokens; random page bounds; each step's query drifts from
//! the previous one (`q ← 0.95·q + 0.31·noise`), so consecutive selections overlap as
//! they do in decoding; the first 30 steps warm the cache, the next 20 are measured.
//! Phases are timed with CUDA events between them in one eager step (launch gaps
//! included); "PCIe" is the bytes read from the host tier per step (misses fetched +
//! spilled pages attended in place).

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!(
        "tiered_step_bench needs the `cuda` feature: cargo run --release --features cuda --example tiered_step_bench"
    );
}

#[cfg(feature = "cuda")]
fn main() -> anyhow::Result<()> {
    bench::main()
}

#[cfg(feature = "cuda")]
mod bench {
    use anyhow::{bail, Result};
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent, CudaStream};
    use candle_core::{DType, Device, Tensor};
    use spinkv::ops::selection_to_pages;
    use spinkv::ops::{self, PageList, SideStream};
    use spinkv::tiered::PinnedPagePool;
    use spinkv::tiered::{DeviceLru, ResolveRequest};
    use std::io::Write;
    use std::sync::Arc;

    const HQ: usize = 32;
    const HKV: usize = 8;
    const D: usize = 128;
    const P: usize = 16;
    const BUDGET: usize = 2048;
    const WAYS: usize = 8;
    const PAGE_BYTES: usize = 2 * P * D * 2;
    const WARMUP: usize = 30;
    const MEASURED: usize = 20;
    const PHASES: [&str; 5] = ["score", "select", "resolve", "fetch", "attend"];
    /// The `homes` layout's cache, as a share of the pages left in the host tier.
    const HOMES_CACHE: f64 = 0.1;
    /// `ops::set_side_copy_blocks`'s default (reported for overlapped rows run without
    /// `--side-blocks`).
    const DEFAULT_SIDE_BLOCKS: u32 = 32;

    struct Row {
        l: usize,
        b: usize,
        fraction: f64,
        layout: &'static str,
        overlap: bool,
        /// Most blocks of the side stream's copy (0: in order).
        side_blocks: u32,
        phases_us: [f64; 5],
        total_us: f64,
        hbm_us: f64,
        hit_rate: f64,
        pcie_mb: f64,
        fetch_gbs: f64,
    }

    /// A recorded selection trace at this layer shape: `sel[step]` is `[B, HKV, k]` u32
    /// logical pages (NONE-padded) on the device.
    struct Replay {
        b: usize,
        np: usize,
        k: usize,
        sel: Vec<Tensor>,
    }

    fn load_trace(path: &str, layer: Option<u32>, dev: &Device) -> Result<Replay> {
        let f = std::io::BufReader::new(std::fs::File::open(path)?);
        let all = spinkv::trace::read_csv(f)?;
        let layer = layer.unwrap_or(all.iter().map(|r| r.layer).max().unwrap_or(0) / 2);
        let recs: Vec<_> = all.into_iter().filter(|r| r.layer == layer).collect();
        let mut rows: Vec<(u64, u32)> = recs.iter().map(|r| (r.seq, r.kv_head)).collect();
        rows.sort_unstable();
        rows.dedup();
        let b = rows.len() / HKV;
        if b == 0 {
            bail!(
                "{path}: layer {layer} has {} (request, KV head) rows, fewer than {HKV}",
                rows.len()
            );
        }
        rows.truncate(b * HKV);
        let np = recs.iter().map(|r| r.num_pages as usize).max().unwrap_or(0);
        let k = recs.iter().map(|r| r.pages.len()).max().unwrap_or(0);
        let mut steps: std::collections::BTreeMap<u64, Vec<u32>> = Default::default();
        for r in &recs {
            if let Ok(i) = rows.binary_search(&(r.seq, r.kv_head)) {
                let v = steps.entry(r.step).or_insert_with(|| vec![ops::NONE; b * HKV * k]);
                v[i * k..i * k + r.pages.len()].copy_from_slice(&r.pages);
            }
        }
        // The 50 consecutive steps with the most selections (the fullest batch).
        let n = steps.len();
        let want = (WARMUP + MEASURED).min(n);
        let busy: Vec<usize> = steps
            .values()
            .map(|v| v.iter().filter(|&&p| p != ops::NONE).count())
            .collect();
        let start = (0..=n - want)
            .max_by_key(|&s| (busy[s..s + want].iter().sum::<usize>(), std::cmp::Reverse(s)))
            .unwrap_or(0);
        eprintln!(
            "trace {path}: layer {layer}, {} rows as B = {b} × {HKV} KV heads, {np} pages, ≤ {k} selected, {n} steps \
             (replaying {want} from step index {start}: {:.0}% of the rows' selections filled)",
            rows.len(),
            100.0 * busy[start..start + want].iter().sum::<usize>() as f64 / (want * b * HKV * k).max(1) as f64
        );
        let sel = steps
            .into_values()
            .skip(start)
            .take(want)
            .map(|v| Tensor::from_vec(v, (b, HKV, k), dev))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Replay { b, np, k, sel })
    }

    fn event(stream: &Arc<CudaStream>) -> Result<CudaEvent> {
        let e = stream.context().new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        e.record(stream)?;
        Ok(e)
    }

    pub fn main() -> Result<()> {
        let args: Vec<String> = std::env::args().collect();
        let quick = args.iter().any(|a| a == "--quick");
        let csv = args
            .iter()
            .position(|a| a == "--csv")
            .and_then(|i| args.get(i + 1))
            .cloned();
        let side_blocks: Vec<u32> = match args.iter().position(|a| a == "--side-blocks") {
            Some(i) => args
                .get(i + 1)
                .ok_or_else(|| anyhow::anyhow!("--side-blocks needs a list, e.g. 16,32,64"))?
                .split(',')
                .map(|x| x.parse::<u32>())
                .collect::<std::result::Result<_, _>>()?,
            None => vec![0],
        };
        let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1));
        // A device of its own stream with event tracking off: the kind a side stream needs.
        let dev = ops::cuda_device(0)?;
        let replay = match arg("--trace") {
            Some(path) => {
                let layer = arg("--trace-layer").map(|x| x.parse::<u32>()).transpose()?;
                Some(load_trace(path, layer, &dev)?)
            }
            None => None,
        };
        let side = SideStream::new(&dev)?.ok_or_else(|| anyhow::anyhow!("no side stream on this device"))?;
        let stream = match &dev {
            Device::Cuda(c) => c.cuda_stream(),
            _ => bail!("not a CUDA device"),
        };
        let (contexts, batches): (Vec<usize>, Vec<usize>) = match &replay {
            Some(r) => (vec![r.np * P], vec![r.b]),
            None if quick => (vec![32768], vec![8]),
            None => (vec![32768, 131072], vec![8, 32]),
        };
        let fractions: &[f64] = if quick { &[0.05, 0.5] } else { &[0.05, 0.10, 0.25, 0.50] };
        let scale = 1.0 / (D as f32).sqrt();
        let kpages = replay.as_ref().map_or(BUDGET / P, |r| r.k);
        let mut rows = Vec::new();
        for &l in &contexts {
            for &b in &batches {
                let np = l / P;
                let slots = b * HKV * np;
                let t0 = std::time::Instant::now();
                let host = PinnedPagePool::new(&dev, slots, P, D, DType::BF16)?;
                // All of the KV in HBM: the reference in the same run.
                let hbm = Tensor::zeros((slots, 2, P, D), DType::BF16, &dev)?;
                let meta = Tensor::randn(0f32, 1.0, (slots, 2, D), &dev)?.to_dtype(DType::BF16)?;
                eprintln!(
                    "L={l} B={b}: {:.1} GiB pinned host tier allocated in {:.1} s",
                    (slots * PAGE_BYTES) as f64 / (1u64 << 30) as f64,
                    t0.elapsed().as_secs_f64()
                );
                let cand = Tensor::arange(0u32, slots as u32, &dev)?.reshape((b, HKV, np))?;
                let owners: Vec<u32> = (0..b as u32)
                    .flat_map(|i| std::iter::repeat_n(i, HKV * kpages))
                    .collect();
                let owners = Tensor::from_vec(owners, b * HKV * kpages, &dev)?;
                let queries: Vec<u32> = (0..b).flat_map(|i| [i as u32, (l - 1) as u32]).collect();
                let queries = Tensor::from_vec(queries, (b, 2), &dev)?;
                let kv_limit = Tensor::from_vec(vec![l as u32; b], b, &dev)?;
                let list = |pairs: &Tensor| -> Result<PageList> {
                    Ok(PageList {
                        pages: pairs.reshape((b, HKV, kpages, 2))?.contiguous()?,
                        queries: queries.clone(),
                        kv_limit: kv_limit.clone(),
                    })
                };
                let drift = |q: &Tensor| -> Result<Tensor> {
                    let noise = Tensor::randn(0f32, 1.0, (b, HQ, D), &dev)?;
                    Ok(((q * 0.95)? + (noise * 0.31)?)?)
                };
                // Step i of `total`: a drifting query's top-k, or the trace's pages.
                let select = |q: &Tensor, cand: &Tensor, i: usize, total: usize| -> Result<Tensor> {
                    let s = ops::quest_page_scores(&q.to_dtype(DType::BF16)?, &meta, cand, 1, 2)?;
                    let mut sel = ops::topk_indices(&s.reshape((b * HKV, np))?, kpages)?.reshape((b, HKV, kpages))?;
                    if let Some(r) = &replay {
                        sel = r.sel[(r.sel.len().saturating_sub(total) + i) % r.sel.len()].clone();
                    }
                    Ok(selection_to_pages(cand, &sel)?)
                };

                // Reference: all of the KV in HBM.
                let mut q = Tensor::randn(0f32, 1.0, (b, HQ, D), &dev)?;
                let mut hbm_total = 0.0;
                for i in 0..WARMUP.min(5) + MEASURED {
                    q = drift(&q)?;
                    let e0 = event(&stream)?;
                    let pairs = select(&q, &cand, i, WARMUP.min(5) + MEASURED)?;
                    ops::sparse_paged_attention(&q.to_dtype(DType::BF16)?, &hbm, &list(&pairs)?, scale)?;
                    let e1 = event(&stream)?;
                    e1.synchronize()?;
                    if i >= WARMUP.min(5) {
                        hbm_total += e0.elapsed_ms(&e1)? as f64 * 1e3 / MEASURED as f64;
                    }
                }

                let layouts = fractions.iter().flat_map(|&f| {
                    let homes = (f > HOMES_CACHE).then_some((f, "homes", true));
                    [(f, "cache", false), (f, "cache", true)].into_iter().chain(homes)
                });
                // Overlapped layouts once per --side-blocks value (0: the default).
                let runs = layouts.flat_map(|(f, layout, overlap)| {
                    let blocks = if overlap { side_blocks.clone() } else { vec![0] };
                    blocks.into_iter().map(move |sb| (f, layout, overlap, sb))
                });
                for (fraction, layout, overlap, sb) in runs {
                    if sb > 0 {
                        ops::set_side_copy_blocks(sb);
                    }
                    // Pages homed in HBM: the first sequences' ids (pages are seq-major).
                    let homed = if layout == "homes" {
                        (slots as f64 * (fraction - HOMES_CACHE) / (1.0 - HOMES_CACHE)) as usize
                    } else {
                        0
                    };
                    let cached = if layout == "homes" {
                        HOMES_CACHE * (slots - homed) as f64
                    } else {
                        slots as f64 * fraction
                    };
                    let buckets = (cached as usize / WAYS).max(1);
                    let mut lru = DeviceLru::new(buckets, WAYS, b, slots - homed, &dev)?.with_fast_homes(homed)?;
                    let fast = Tensor::zeros((lru.fast_slots(), 2, P, D), DType::BF16, &dev)?;
                    // Ids rotated so that homes (ids >= slots - homed) are the first sequences'.
                    let rotated: Vec<u32> = (0..slots).map(|i| ((i + slots - homed) % slots) as u32).collect();
                    let cand = Tensor::from_vec(rotated, (b, HKV, np), &dev)?;
                    lru.set_budgets(&vec![u32::MAX; b])?;
                    let mut q = Tensor::randn(0f32, 1.0, (b, HQ, D), &dev)?;
                    let mut phases = [0f64; 5];
                    let mut total = 0.0;
                    let (mut hits, mut misses, mut spilled) = (0u64, 0u64, 0u64);
                    for i in 0..WARMUP + MEASURED {
                        q = drift(&q)?;
                        let qb = q.to_dtype(DType::BF16)?;
                        let e0 = event(&stream)?;
                        let s = ops::quest_page_scores(&qb, &meta, &cand, 1, 2)?;
                        let e1 = event(&stream)?;
                        let mut sel =
                            ops::topk_indices(&s.reshape((b * HKV, np))?, kpages)?.reshape((b, HKV, kpages))?;
                        if let Some(r) = &replay {
                            sel = r.sel[(r.sel.len().saturating_sub(WARMUP + MEASURED) + i) % r.sel.len()].clone();
                        }
                        let pairs = selection_to_pages(&cand, &sel)?;
                        let host_slots = pairs.narrow(3, 0, 1)?.flatten_all()?.contiguous()?;
                        let logical = pairs.narrow(3, 1, 1)?.flatten_all()?.contiguous()?;
                        let e2 = event(&stream)?;
                        let out = lru.resolve(&ResolveRequest {
                            host_slots: &host_slots,
                            logical: &logical,
                            owners: &owners,
                            step: (i + 1) as u32,
                            reuse_steps: 2,
                        })?;
                        let e3 = event(&stream)?;
                        let e4;
                        if overlap {
                            side.fork()?;
                            host.gather_counted_on(&fast, &out.misses, &out.miss_count, &side)?;
                            e4 = event(&stream)?;
                            let a = ops::sparse_paged_attention(&qb, &fast, &list(&out.ready_pairs)?, scale)?;
                            let sp = host.attend(&qb, &list(&out.spill_pairs)?, scale)?;
                            let ahead = ops::merge_partials(&a, &sp)?;
                            side.join()?;
                            let f = ops::sparse_paged_attention(&qb, &fast, &list(&out.fetched_pairs)?, scale)?;
                            ops::merge_partials(&ahead, &f)?;
                        } else {
                            host.gather_counted(&fast, &out.misses, &out.miss_count)?;
                            e4 = event(&stream)?;
                            let a = ops::sparse_paged_attention(&qb, &fast, &list(&out.fast_pairs)?, scale)?;
                            let sp = host.attend(&qb, &list(&out.spill_pairs)?, scale)?;
                            ops::merge_partials(&a, &sp)?;
                        }
                        let e5 = event(&stream)?;
                        e5.synchronize()?;
                        let (_, [h, m, sp]) = lru.take_step_counters()?;
                        if i >= WARMUP {
                            let ev = [&e0, &e1, &e2, &e3, &e4, &e5];
                            for k in 0..5 {
                                phases[k] += ev[k].elapsed_ms(ev[k + 1])? as f64 * 1e3 / MEASURED as f64;
                            }
                            if overlap {
                                // Fetch and attend overlap: one phase, in the attend column.
                                phases[4] += phases[3];
                                phases[3] = 0.0;
                            }
                            total += e0.elapsed_ms(&e5)? as f64 * 1e3 / MEASURED as f64;
                            hits += h;
                            misses += m;
                            spilled += sp;
                        }
                    }
                    let per_step = (misses + spilled) as f64 / MEASURED as f64;
                    let fetch_bytes = misses as f64 / MEASURED as f64 * PAGE_BYTES as f64;
                    rows.push(Row {
                        l,
                        b,
                        fraction,
                        layout,
                        overlap,
                        side_blocks: if overlap && sb == 0 { DEFAULT_SIDE_BLOCKS } else { sb },
                        phases_us: phases,
                        total_us: total,
                        hbm_us: hbm_total,
                        hit_rate: hits as f64 / (hits + misses + spilled).max(1) as f64,
                        pcie_mb: per_step * PAGE_BYTES as f64 / 1e6,
                        fetch_gbs: if overlap {
                            f64::NAN
                        } else {
                            fetch_bytes / (phases[3] * 1e-6) / 1e9
                        },
                    });
                    let r = rows.last().unwrap_or_else(|| unreachable!());
                    eprintln!(
                        "  {:>4.0}% HBM ({layout}{}, side blocks {sb}): {:.0} µs (all in HBM {:.0} µs), hit {:.1}%, {:.1} MB over PCIe",
                        fraction * 100.0,
                        if overlap { ", overlap" } else { "" },
                        r.total_us,
                        r.hbm_us,
                        r.hit_rate * 100.0,
                        r.pcie_mb
                    );
                }
                drop((host, hbm, meta));
            }
        }
        println!(
            "\n| L | B | HBM % | layout | overlap (copy blocks) | {} | step µs | all-in-HBM µs | ratio | hit rate | PCIe MB/step | fetch GB/s |",
            PHASES.join(" µs | ") + " µs"
        );
        println!("|{}", "---|".repeat(17));
        for r in &rows {
            println!(
                "| {}K | {} | {:.0} | {} | {} | {} | {:.0} | {:.0} | {:.2}× | {:.1}% | {:.1} | {:.1} |",
                r.l / 1024,
                r.b,
                r.fraction * 100.0,
                r.layout,
                if r.overlap {
                    format!("yes ({})", r.side_blocks)
                } else {
                    "no".into()
                },
                r.phases_us
                    .iter()
                    .map(|x| format!("{x:.0}"))
                    .collect::<Vec<_>>()
                    .join(" | "),
                r.total_us,
                r.hbm_us,
                r.hbm_us / r.total_us,
                r.hit_rate * 100.0,
                r.pcie_mb,
                r.fetch_gbs
            );
        }
        if let Some(path) = csv {
            let mut f = std::fs::File::create(&path)?;
            writeln!(
                f,
                "context,batch,hbm_fraction,layout,overlap,side_copy_blocks,score_us,select_us,resolve_us,fetch_us,attend_us,step_us,all_in_hbm_us,hit_rate,pcie_mb_per_step,fetch_gbs"
            )?;
            for r in &rows {
                writeln!(
                    f,
                    "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                    r.l,
                    r.b,
                    r.fraction,
                    r.layout,
                    r.overlap,
                    r.side_blocks,
                    r.phases_us[0],
                    r.phases_us[1],
                    r.phases_us[2],
                    r.phases_us[3],
                    r.phases_us[4],
                    r.total_us,
                    r.hbm_us,
                    r.hit_rate,
                    r.pcie_mb,
                    r.fetch_gbs
                )?;
            }
        }
        Ok(())
    }
}
