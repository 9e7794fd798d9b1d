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
//! Each layout runs in each of `SpinCache`'s fetch modes (`spinkv::FetchMode`): in order
//! (resolve → fetch → attend the fast tier → attend the unplaced pages from the host →
//! merge), side stream (the misses are copied on a side stream, `ops::SideStream`, while
//! the pages resident before the round are attended; the fetched pages are attended after
//! the join and merged) and in kernel (`PinnedPagePool::attend_tiered`: one attention
//! launch reads misses from the host tier and fills them). Side-stream and in-kernel rows
//! time fetch and attend as one phase (in the attend column). `--side-blocks 16,32,64`
//! runs each side-stream layout once per most-blocks value of the side stream's copy
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
//! included); the whole step is also captured as a CUDA graph and replayed (the way the
//! engine's decode runs it), next to the all-in-HBM step replayed the same way; "PCIe" is the bytes read from the host tier per step (misses fetched +
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
    use spinkv::ops::{self, PageList, SideStream, StepGraph};
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

    /// A tiered step's miss path (`spinkv::FetchMode`'s three).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Fetch {
        InOrder,
        SideStream,
        InKernel,
    }

    impl Fetch {
        fn name(self) -> &'static str {
            match self {
                Self::InOrder => "in-order",
                Self::SideStream => "side-stream",
                Self::InKernel => "in-kernel",
            }
        }
    }

    struct Row {
        l: usize,
        b: usize,
        fraction: f64,
        layout: &'static str,
        fetch: Fetch,
        /// Most blocks of the side stream's copy (0: in order).
        side_blocks: u32,
        phases_us: [f64; 5],
        total_us: f64,
        hbm_us: f64,
        /// The step and the all-in-HBM step replayed as CUDA graphs.
        graph_us: f64,
        hbm_graph_us: f64,
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

    /// Mean µs of `MEASURED` replays of `work` captured as a CUDA graph (after a warm-up
    /// run and the capture), `before(state, i)` writing step i's inputs outside the graph.
    fn graph_us<S>(
        dev: &Device,
        stream: &Arc<CudaStream>,
        state: &mut S,
        mut before: impl FnMut(&mut S, usize) -> Result<()>,
        mut work: impl FnMut(&mut S) -> spinkv::Result<()>,
    ) -> Result<f64> {
        before(state, 0)?;
        StepGraph::warm_up(dev, || work(state))?;
        before(state, 1)?;
        let (graph, ()) = StepGraph::capture(dev, || work(state))?;
        let mut us = 0.0;
        for i in 0..MEASURED {
            before(state, 2 + i)?;
            let e0 = event(stream)?;
            graph.launch()?;
            let e1 = event(stream)?;
            e1.synchronize()?;
            us += e0.elapsed_ms(&e1)? as f64 * 1e3 / MEASURED as f64;
        }
        Ok(us)
    }

    fn event(stream: &Arc<CudaStream>) -> Result<CudaEvent> {
        let e = stream.context().new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        e.record(stream)?;
        Ok(e)
    }

    pub fn main() -> Result<()> {
        let args: Vec<String> = std::env::args().collect();
        let quick = args.iter().any(|a| a == "--quick");
        let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1));
        let csv = arg("--csv").cloned();
        let side_blocks: Vec<u32> = match args.iter().position(|a| a == "--side-blocks") {
            Some(i) => args
                .get(i + 1)
                .ok_or_else(|| anyhow::anyhow!("--side-blocks needs a list, e.g. 16,32,64"))?
                .split(',')
                .map(|x| x.parse::<u32>())
                .collect::<std::result::Result<_, _>>()?,
            None => vec![0],
        };
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
                let list = |pairs: &Tensor| -> spinkv::Result<PageList> {
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
                // A step's inputs live in buffers written in place before the step, so that a
                // captured step (CUDA graph) reads each step's own at replay.
                let q_buf = Tensor::zeros((b, HQ, D), DType::BF16, &dev)?;
                let sel_buf = Tensor::zeros((b, HKV, kpages), DType::U32, &dev)?;
                // Step i of `total`: the query drifted from the last, and the trace's pages.
                let next_inputs = |q: &mut Tensor, i: usize, total: usize| -> Result<()> {
                    *q = drift(q)?;
                    q_buf.slice_set(&q.to_dtype(DType::BF16)?, 0, 0)?;
                    if let Some(r) = &replay {
                        sel_buf.slice_set(&r.sel[(r.sel.len().saturating_sub(total) + i) % r.sel.len()], 0, 0)?;
                    }
                    Ok(())
                };
                // The page pairs of q_buf's top-k (of the trace's pages when replaying).
                let pages_of = |top: Tensor, cand: &Tensor| -> spinkv::Result<Tensor> {
                    let top = top.reshape((b, HKV, kpages))?;
                    selection_to_pages(cand, if replay.is_some() { &sel_buf } else { &top })
                };
                let topk = |scores: &Tensor| -> spinkv::Result<Tensor> {
                    ops::topk_indices(&scores.reshape((b * HKV, np))?, kpages)
                };

                // Reference: all of the KV in HBM, eager and as a graph.
                let hbm_work = || -> spinkv::Result<()> {
                    let s = ops::quest_page_scores(&q_buf, &meta, &cand, 1, 2)?;
                    let pairs = pages_of(topk(&s)?, &cand)?;
                    ops::sparse_paged_attention(&q_buf, &hbm, &list(&pairs)?, scale)?;
                    Ok(())
                };
                let mut q = Tensor::randn(0f32, 1.0, (b, HQ, D), &dev)?;
                let mut hbm_total = 0.0;
                for i in 0..WARMUP.min(5) + MEASURED {
                    next_inputs(&mut q, i, WARMUP.min(5) + MEASURED)?;
                    let e0 = event(&stream)?;
                    hbm_work()?;
                    let e1 = event(&stream)?;
                    e1.synchronize()?;
                    if i >= WARMUP.min(5) {
                        hbm_total += e0.elapsed_ms(&e1)? as f64 * 1e3 / MEASURED as f64;
                    }
                }
                let hbm_graph = graph_us(
                    &dev,
                    &stream,
                    &mut (),
                    |_, i| next_inputs(&mut q, i, MEASURED + 2),
                    |_| hbm_work(),
                )
                .unwrap_or_else(|e| {
                    eprintln!("all in HBM: the graph failed: {e:#}");
                    f64::NAN
                });

                let layouts = fractions.iter().flat_map(|&f| {
                    let modes = [Fetch::InOrder, Fetch::SideStream, Fetch::InKernel];
                    let homes = (f > HOMES_CACHE).then_some((f, "homes", Fetch::InKernel));
                    modes.map(|m| (f, "cache", m)).into_iter().chain(homes)
                });
                // Side-stream layouts once per --side-blocks value (0: the default).
                let runs = layouts.flat_map(|(f, layout, fetch)| {
                    let blocks = if fetch == Fetch::SideStream {
                        side_blocks.clone()
                    } else {
                        vec![0]
                    };
                    blocks.into_iter().map(move |sb| (f, layout, fetch, sb))
                });
                for (fraction, layout, fetch, sb) in runs {
                    let overlap = fetch != Fetch::InOrder;
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
                    // One tiered step over q_buf; `mark` runs after each phase but the last.
                    let work = |lru: &mut DeviceLru, step: u32, mark: &mut dyn FnMut() -> spinkv::Result<()>| {
                        let s = ops::quest_page_scores(&q_buf, &meta, &cand, 1, 2)?;
                        mark()?;
                        let pairs = pages_of(topk(&s)?, &cand)?;
                        let host_slots = pairs.narrow(3, 0, 1)?.flatten_all()?.contiguous()?;
                        let logical = pairs.narrow(3, 1, 1)?.flatten_all()?.contiguous()?;
                        mark()?;
                        let out = lru.resolve(&ResolveRequest {
                            host_slots: &host_slots,
                            logical: &logical,
                            owners: &owners,
                            step,
                            reuse_steps: 2,
                        })?;
                        mark()?;
                        if fetch == Fetch::InKernel {
                            // No fetch phase: the attention reads and fills the misses.
                            mark()?;
                            let src = out.tiered_src.reshape((b, HKV, kpages))?;
                            host.attend_tiered(&q_buf, &fast, &list(&out.tiered_pairs)?, &src, scale)?;
                        } else if overlap {
                            side.fork()?;
                            host.gather_counted_on(&fast, &out.misses, &out.miss_count, &side)?;
                            mark()?;
                            let a = ops::sparse_paged_attention(&q_buf, &fast, &list(&out.ready_pairs)?, scale)?;
                            let sp = host.attend(&q_buf, &list(&out.spill_pairs)?, scale)?;
                            let ahead = ops::merge_partials(&a, &sp)?;
                            side.join()?;
                            let f = ops::sparse_paged_attention(&q_buf, &fast, &list(&out.fetched_pairs)?, scale)?;
                            ops::merge_partials(&ahead, &f)?;
                        } else {
                            host.gather_counted(&fast, &out.misses, &out.miss_count)?;
                            mark()?;
                            let a = ops::sparse_paged_attention(&q_buf, &fast, &list(&out.fast_pairs)?, scale)?;
                            let sp = host.attend(&q_buf, &list(&out.spill_pairs)?, scale)?;
                            ops::merge_partials(&a, &sp)?;
                        }
                        spinkv::Result::Ok(())
                    };
                    let mut q = Tensor::randn(0f32, 1.0, (b, HQ, D), &dev)?;
                    let mut phases = [0f64; 5];
                    let mut total = 0.0;
                    let (mut hits, mut misses, mut spilled) = (0u64, 0u64, 0u64);
                    for i in 0..WARMUP + MEASURED {
                        next_inputs(&mut q, i, WARMUP + MEASURED)?;
                        let mut ev = vec![event(&stream)?];
                        let mut mark = || -> spinkv::Result<()> {
                            ev.push(event(&stream).map_err(|e| spinkv::Error::Config(e.to_string()))?);
                            Ok(())
                        };
                        work(&mut lru, (i + 1) as u32, &mut mark)?;
                        ev.push(event(&stream)?);
                        ev[5].synchronize()?;
                        let (_, [h, m, sp]) = lru.take_step_counters()?;
                        if i >= WARMUP {
                            for k in 0..5 {
                                phases[k] += ev[k].elapsed_ms(&ev[k + 1])? as f64 * 1e3 / MEASURED as f64;
                            }
                            if overlap {
                                // Fetch and attend overlap: one phase, in the attend column.
                                phases[4] += phases[3];
                                phases[3] = 0.0;
                            }
                            total += ev[0].elapsed_ms(&ev[5])? as f64 * 1e3 / MEASURED as f64;
                            hits += h;
                            misses += m;
                            spilled += sp;
                        }
                    }
                    // The same steps captured once and replayed (as the engine's decode runs).
                    let first = (WARMUP + MEASURED + 1) as u32;
                    let graph = graph_us(
                        &dev,
                        &stream,
                        &mut (lru, first),
                        |(lru, step), i| {
                            next_inputs(&mut q, i, MEASURED + 2)?;
                            *step = first + i as u32;
                            Ok(lru.set_step(*step)?)
                        },
                        |(lru, step)| work(lru, *step, &mut || Ok(())),
                    )
                    .unwrap_or_else(|e| {
                        eprintln!("{layout}: the graph failed: {e:#}");
                        f64::NAN
                    });
                    let per_step = (misses + spilled) as f64 / MEASURED as f64;
                    let fetch_bytes = misses as f64 / MEASURED as f64 * PAGE_BYTES as f64;
                    rows.push(Row {
                        l,
                        b,
                        fraction,
                        layout,
                        fetch,
                        side_blocks: match (fetch, sb) {
                            (Fetch::SideStream, 0) => DEFAULT_SIDE_BLOCKS,
                            (Fetch::SideStream, sb) => sb,
                            _ => 0,
                        },
                        phases_us: phases,
                        total_us: total,
                        hbm_us: hbm_total,
                        graph_us: graph,
                        hbm_graph_us: hbm_graph,
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
                        "  {:>4.0}% HBM ({layout}, {}, side blocks {sb}): {:.0} µs (all in HBM {:.0} µs; graphs {:.0} / {:.0} µs), hit {:.1}%, {:.1} MB over PCIe",
                        fraction * 100.0,
                        fetch.name(),
                        r.total_us,
                        r.hbm_us,
                        r.graph_us,
                        r.hbm_graph_us,
                        r.hit_rate * 100.0,
                        r.pcie_mb
                    );
                }
                drop((host, hbm, meta));
            }
        }
        println!(
            "\n| L | B | HBM % | layout | fetch (copy blocks) | {} | step µs | all-in-HBM µs | ratio | graph step µs | graph all-in-HBM µs | graph ratio | hit rate | PCIe MB/step | fetch GB/s |",
            PHASES.join(" µs | ") + " µs"
        );
        println!("|{}", "---|".repeat(20));
        for r in &rows {
            println!(
                "| {}K | {} | {:.0} | {} | {} | {} | {:.0} | {:.0} | {:.2}× | {:.0} | {:.0} | {:.2}× | {:.1}% | {:.1} | {:.1} |",
                r.l / 1024,
                r.b,
                r.fraction * 100.0,
                r.layout,
                if r.side_blocks > 0 {
                    format!("{} ({})", r.fetch.name(), r.side_blocks)
                } else {
                    r.fetch.name().into()
                },
                r.phases_us
                    .iter()
                    .map(|x| format!("{x:.0}"))
                    .collect::<Vec<_>>()
                    .join(" | "),
                r.total_us,
                r.hbm_us,
                r.hbm_us / r.total_us,
                r.graph_us,
                r.hbm_graph_us,
                r.hbm_graph_us / r.graph_us,
                r.hit_rate * 100.0,
                r.pcie_mb,
                r.fetch_gbs
            );
        }
        if let Some(path) = csv {
            let mut f = std::fs::File::create(&path)?;
            writeln!(
                f,
                "context,batch,hbm_fraction,layout,fetch,side_copy_blocks,score_us,select_us,resolve_us,fetch_us,attend_us,step_us,all_in_hbm_us,graph_step_us,graph_all_in_hbm_us,hit_rate,pcie_mb_per_step,fetch_gbs"
            )?;
            for r in &rows {
                writeln!(
                    f,
                    "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                    r.l,
                    r.b,
                    r.fraction,
                    r.layout,
                    r.fetch.name(),
                    r.side_blocks,
                    r.phases_us[0],
                    r.phases_us[1],
                    r.phases_us[2],
                    r.phases_us[3],
                    r.phases_us[4],
                    r.total_us,
                    r.hbm_us,
                    r.graph_us,
                    r.hbm_graph_us,
                    r.hit_rate,
                    r.pcie_mb,
                    r.fetch_gbs
                )?;
            }
        }
        Ok(())
    }
}
