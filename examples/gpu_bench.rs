//! GPU benchmark of the CUDA kernels at the Llama-3.1-8B layer shape (32 query heads,
//! 8 KV heads, head_dim 128, bf16, page 16): sparse attention over a 2048-token budget,
//! the same kernel dense over all pages, Quest scoring + top-k, and a whole Quest decode
//! step for one layer at the op level (append + metadata + score + top-k + page list +
//! attend, no host synchronization inside; also with the fused append + min/max kernel,
//! and that kernel alone against the two it replaces), for contexts 8K/32K/128K and batch
//! 1/8/32.
//! Each figure is printed next to its floor (bytes / measured HBM copy bandwidth) and
//! the PyTorch anchors measured on the same kind of GPU (`shared/anchors/`).
//!
//! `cargo run --release --features cuda --example gpu_bench [-- --quick] [-- --csv FILE]
//! [--contexts 32768,131072] [--batches 8] [--page-order random|by-head]`
//!
//! Pages sit in the pool in a random order by default; `--page-order by-head` puts each
//! (sequence, KV head)'s pages in one run of slots, as `PageLayout::ByDirectory` does.
//!
//! Timing: CUDA events around `iters` back-to-back calls after warm-up, the median of
//! several repetitions; "graph" rows replay the step captured in a CUDA graph (no host
//! launch overhead).

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("gpu_bench needs the `cuda` feature: cargo run --release --features cuda --example gpu_bench");
}

#[cfg(feature = "cuda")]
fn main() -> anyhow::Result<()> {
    bench::main()
}

#[cfg(feature = "cuda")]
mod bench {
    use anyhow::{bail, Result};
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaStream};
    use candle_core::{DType, Device, Tensor};
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use spinkv::ops::{self, PageList};
    use std::sync::Arc;

    const HQ: usize = 32;
    const HKV: usize = 8;
    const D: usize = 128;
    const P: usize = 16;
    const BUDGET: usize = 2048;
    const PAGE_BYTES: usize = 2 * P * D * 2;
    const META_BYTES: usize = 2 * D * 2;

    /// PyTorch anchors on one H200 (shared/anchors/h200-torch*-2026-11-29.json), µs.
    fn anchor(kind: &str, l: usize, b: usize) -> Option<f64> {
        let t: &[(&str, usize, usize, f64)] = &[
            ("dense", 8192, 1, 22.7),
            ("dense", 8192, 8, 78.9),
            ("dense", 8192, 32, 246.7),
            ("dense", 32768, 1, 49.7),
            ("dense", 32768, 8, 252.2),
            ("dense", 32768, 32, 935.1),
            ("dense", 131072, 1, 137.0),
            ("dense", 131072, 8, 937.0),
            ("sparse", 8192, 1, 36.2),
            ("sparse", 8192, 8, 145.4),
            ("sparse", 8192, 32, 498.9),
            ("sparse", 32768, 1, 35.8),
            ("sparse", 32768, 8, 145.9),
            ("sparse", 32768, 32, 499.4),
            ("sparse", 131072, 1, 36.0),
            ("sparse", 131072, 8, 145.7),
            ("step", 32768, 1, 170.8),
            ("step", 32768, 8, 731.6),
            ("step", 131072, 1, 374.9),
            ("step", 131072, 8, 2387.3),
        ];
        t.iter()
            .find(|(k, ll, bb, _)| *k == kind && *ll == l && *bb == b)
            .map(|x| x.3)
    }

    struct Timer {
        stream: Arc<CudaStream>,
    }

    impl Timer {
        /// Median over `reps` of the mean time (µs) of `iters` back-to-back calls.
        fn time(&self, warmup: usize, reps: usize, iters: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
            for _ in 0..warmup {
                f()?;
            }
            self.stream.synchronize()?;
            let ctx = self.stream.context();
            let mut v = Vec::with_capacity(reps);
            for _ in 0..reps {
                let e0 = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
                let e1 = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
                e0.record(&self.stream)?;
                for _ in 0..iters {
                    f()?;
                }
                e1.record(&self.stream)?;
                e1.synchronize()?;
                v.push(e0.elapsed_ms(&e1)? as f64 * 1000.0 / iters as f64);
            }
            v.sort_by(|a, b| a.total_cmp(b));
            Ok(v[v.len() / 2])
        }
    }

    /// Times `f` and records a row; a failure is printed with its context and skipped.
    #[allow(clippy::too_many_arguments)]
    fn measure(
        rows: &mut Vec<Row>,
        timer: &Timer,
        what: &str,
        l: usize,
        b: usize,
        iters: usize,
        bytes: f64,
        anchor: Option<f64>,
        f: &mut dyn FnMut() -> Result<()>,
    ) {
        let res = f().and_then(|_| timer.time(3, 7, iters, f));
        match res {
            Ok(us) => rows.push(Row {
                what: what.to_string(),
                l,
                b,
                us,
                bytes,
                anchor,
            }),
            Err(e) => println!("FAILED {what} L={l} B={b}: {e:?}"),
        }
    }

    /// (label, anchor kind, bytes, the call to capture).
    type GraphCase<'a> = (&'a str, Option<&'a str>, f64, &'a dyn Fn() -> Result<()>);

    struct Row {
        what: String,
        l: usize,
        b: usize,
        us: f64,
        bytes: f64,
        anchor: Option<f64>,
    }

    /// Captures one call of `f` (run once eagerly before, so every module is loaded) into
    /// a CUDA graph. Everything `f` allocates is freed inside the graph.
    fn capture(dev: &Device, stream: &Arc<CudaStream>, f: &dyn Fn() -> Result<()>) -> Result<CudaGraph> {
        f()?;
        stream.synchronize()?;
        let _htod = match dev {
            Device::Cuda(c) => Some(c.enable_cuda_graph_htod_cache()),
            _ => None,
        };
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let res = f();
        let g = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        res?;
        g?.ok_or_else(|| anyhow::anyhow!("empty graph"))
    }

    /// Fills `t` ([slots, ...] bf16) with tiles of one random block.
    fn fill_random(t: &Tensor, r: &mut StdRng) -> Result<()> {
        let dims = t.dims().to_vec();
        let per: usize = dims[1..].iter().product();
        let rows = (64 << 20) / (per * 2);
        let mut shape = dims.clone();
        shape[0] = rows.min(dims[0]);
        let n: usize = shape.iter().product();
        let host: Vec<f32> = (0..n).map(|_| r.random::<f32>() * 2.0 - 1.0).collect();
        let block = Tensor::from_vec(host, shape.as_slice(), t.device())?.to_dtype(t.dtype())?;
        let mut off = 0;
        while off < dims[0] {
            let len = block.dims()[0].min(dims[0] - off);
            t.slice_set(&block.narrow(0, 0, len)?, 0, off)?;
            off += len;
        }
        Ok(())
    }

    pub fn main() -> Result<()> {
        let args: Vec<String> = std::env::args().collect();
        let quick = args.iter().any(|a| a == "--quick");
        let csv = args
            .iter()
            .position(|a| a == "--csv")
            .and_then(|i| args.get(i + 1))
            .cloned();
        let dev = Device::new_cuda(0)?;
        let stream = match &dev {
            Device::Cuda(c) => c.cuda_stream(),
            _ => bail!("not a CUDA device"),
        };
        let timer = Timer { stream: stream.clone() };
        let mut r = StdRng::seed_from_u64(7);

        // HBM bandwidth: a 2 GiB device-to-device copy, read + write counted.
        let n = 1usize << 31;
        let src = stream.alloc_zeros::<u8>(n)?;
        let mut dst = stream.alloc_zeros::<u8>(n)?;
        let copy_us = timer.time(3, 5, 10, &mut || {
            stream.memcpy_dtod(&src, &mut dst)?;
            Ok(())
        })?;
        drop((src, dst));
        let bw = 2.0 * n as f64 / (copy_us * 1e-6); // bytes/s
        println!(
            "HBM copy bandwidth: {:.0} GB/s (2 GiB device-to-device, read + write)",
            bw / 1e9
        );

        // `--contexts L,L,..` / `--batches B,B,..` override the sweep.
        let list = |flag: &str| -> Result<Option<Vec<usize>>> {
            match args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)) {
                None => Ok(None),
                Some(v) => Ok(Some(
                    v.split(',')
                        .map(|x| {
                            x.trim()
                                .parse::<usize>()
                                .map_err(|e| anyhow::anyhow!("{flag} {v}: {e}"))
                        })
                        .collect::<Result<_>>()?,
                )),
            }
        };
        // `--page-order by-head`: each (sequence, KV head)'s pages in one run of slots, in
        // logical order (as `PageLayout::ByDirectory` places a prompt); by default the
        // pages of all rows are shuffled over the pool.
        let by_head = match args
            .iter()
            .position(|a| a == "--page-order")
            .and_then(|i| args.get(i + 1))
        {
            None => false,
            Some(v) if v == "random" => false,
            Some(v) if v == "by-head" => true,
            Some(v) => bail!("--page-order {v}: expected random or by-head"),
        };
        println!("page order: {}", if by_head { "by head" } else { "random" });
        let contexts = list("--contexts")?.unwrap_or(if quick { vec![32768] } else { vec![8192, 32768, 131072] });
        let batches = list("--batches")?.unwrap_or(if quick { vec![8] } else { vec![1, 8, 32] });
        let (contexts, batches) = (&contexts[..], &batches[..]);
        let mut rows = Vec::new();
        let scale = 1.0 / (D as f32).sqrt();
        for &l in contexts {
            for &b in batches {
                let np = l / P;
                let slots = b * HKV * np;
                let kpages = BUDGET / P;
                let pool = Tensor::zeros((slots, 2, P, D), DType::BF16, &dev)?;
                fill_random(&pool, &mut r)?;
                let meta = Tensor::zeros((slots, 2, D), DType::BF16, &dev)?;
                fill_random(&meta, &mut r)?;
                // int8 bounds (QuestConfig::bounds = Int8): random integers, scale 1.0.
                let meta8 = {
                    let ints = Tensor::rand(0f32, 255.0, (slots, 2 * D), &dev)?.to_dtype(DType::U8)?;
                    let mut tail = vec![0u8; ops::QUEST_Q8_TAIL_BYTES];
                    tail[..4].copy_from_slice(&1f32.to_le_bytes());
                    let tail = Tensor::from_vec(tail, (1, ops::QUEST_Q8_TAIL_BYTES), &dev)?
                        .broadcast_as((slots, ops::QUEST_Q8_TAIL_BYTES))?
                        .contiguous()?;
                    Tensor::cat(&[&ints, &tail], 1)?
                };
                let mut perm: Vec<u32> = (0..slots as u32).collect();
                if !by_head {
                    perm.shuffle(&mut r);
                }
                // table[(b, h, lp)] = slot
                let q = Tensor::randn(0f32, 1.0, (b, HQ, D), &dev)?.to_dtype(DType::BF16)?;
                let cand = Tensor::from_vec(perm.clone(), (b, HKV, np), &dev)?;
                // The same candidates with each (sequence, head)'s metadata contiguous.
                let cand_seq = Tensor::arange(0u32, slots as u32, &dev)?.reshape((b, HKV, np))?;
                let mut dense = Vec::with_capacity(slots * 2);
                for (i, &s) in perm.iter().enumerate() {
                    dense.push(s);
                    dense.push((i % np) as u32);
                }
                let mut sparse = Vec::with_capacity(b * HKV * kpages * 2);
                for row in 0..b * HKV {
                    let mut mid: Vec<u32> = (1..np as u32 - 2).collect();
                    mid.shuffle(&mut r);
                    let mut sel: Vec<u32> = vec![0, np as u32 - 2, np as u32 - 1];
                    sel.extend_from_slice(&mid[..kpages - 3]);
                    sel.sort_unstable();
                    for lp in sel {
                        sparse.push(perm[row * np + lp as usize]);
                        sparse.push(lp);
                    }
                }
                let queries: Vec<u32> = (0..b).flat_map(|i| [i as u32, (l - 1) as u32]).collect();
                let queries = Tensor::from_vec(queries, (b, 2), &dev)?;
                let kv_limit = Tensor::from_vec(vec![l as u32; b], b, &dev)?;
                let dense_list = PageList {
                    pages: Tensor::from_vec(dense, (b, HKV, np, 2), &dev)?,
                    queries: queries.clone(),
                    kv_limit: kv_limit.clone(),
                };
                let sparse_list = PageList {
                    pages: Tensor::from_vec(sparse, (b, HKV, kpages, 2), &dev)?,
                    queries: queries.clone(),
                    kv_limit: kv_limit.clone(),
                };
                let sel_bytes = (b * HKV * kpages * PAGE_BYTES) as f64;
                let all_bytes = (b * HKV * np * PAGE_BYTES) as f64;
                let meta_bytes = (b * HKV * np * META_BYTES) as f64;
                let meta8_bytes = (b * HKV * np * ops::quest_q8_row_bytes(D)) as f64;
                let big = all_bytes > 4e9;
                let iters = if big { 5 } else { 20 };

                measure(
                    &mut rows,
                    &timer,
                    "sparse attention (2048 tok)",
                    l,
                    b,
                    iters,
                    sel_bytes,
                    anchor("sparse", l, b),
                    &mut || {
                        ops::sparse_paged_attention(&q, &pool, &sparse_list, scale)?;
                        Ok(())
                    },
                );
                if b == 8 && l == 32768 {
                    // The 16-row kernel variant, for comparison.
                    spinkv::ops::set_attention_g8(false);
                    measure(
                        &mut rows,
                        &timer,
                        "  sparse, 16-row variant",
                        l,
                        b,
                        iters,
                        sel_bytes,
                        anchor("sparse", l, b),
                        &mut || {
                            ops::sparse_paged_attention(&q, &pool, &sparse_list, scale)?;
                            Ok(())
                        },
                    );
                    measure(
                        &mut rows,
                        &timer,
                        "  dense, 16-row variant",
                        l,
                        b,
                        iters,
                        all_bytes,
                        anchor("dense", l, b),
                        &mut || {
                            ops::sparse_paged_attention(&q, &pool, &dense_list, scale)?;
                            Ok(())
                        },
                    );
                    spinkv::ops::set_attention_g8(true);
                }
                measure(
                    &mut rows,
                    &timer,
                    "dense attention (all pages)",
                    l,
                    b,
                    iters,
                    all_bytes,
                    anchor("dense", l, b),
                    &mut || {
                        ops::sparse_paged_attention(&q, &pool, &dense_list, scale)?;
                        Ok(())
                    },
                );
                measure(
                    &mut rows,
                    &timer,
                    "quest score + top-k",
                    l,
                    b,
                    iters,
                    meta_bytes,
                    None,
                    &mut || {
                        let s = ops::quest_page_scores(&q, &meta, &cand, 1, 2)?;
                        ops::topk_indices(&s.reshape((b * HKV, np))?, kpages)?;
                        Ok(())
                    },
                );
                measure(
                    &mut rows,
                    &timer,
                    "  quest score only",
                    l,
                    b,
                    iters,
                    meta_bytes,
                    None,
                    &mut || {
                        ops::quest_page_scores(&q, &meta, &cand, 1, 2)?;
                        Ok(())
                    },
                );
                measure(
                    &mut rows,
                    &timer,
                    "  quest score, contiguous metadata",
                    l,
                    b,
                    iters,
                    meta_bytes,
                    None,
                    &mut || {
                        ops::quest_page_scores(&q, &meta, &cand_seq, 1, 2)?;
                        Ok(())
                    },
                );
                let s_once = ops::quest_page_scores(&q, &meta, &cand, 1, 2)?.reshape((b * HKV, np))?;
                measure(
                    &mut rows,
                    &timer,
                    "  top-k only",
                    l,
                    b,
                    iters,
                    (b * HKV * np * 4) as f64,
                    None,
                    &mut || {
                        ops::topk_indices(&s_once, kpages)?;
                        Ok(())
                    },
                );

                // Whole Quest step for one layer: new token's K/V appended into its page
                // (the last page), metadata widened, score, top-k, page list, attention.
                let knew = Tensor::randn(0f32, 1.0, (b, HKV, D), &dev)?.to_dtype(DType::BF16)?;
                let vnew = Tensor::randn(0f32, 1.0, (b, HKV, D), &dev)?.to_dtype(DType::BF16)?;
                let dst: Vec<u32> = (0..b * HKV)
                    .map(|row| perm[row * np + np - 1] * P as u32 + (P - 1) as u32)
                    .collect();
                let dst = Tensor::from_vec(dst, (b, HKV), &dev)?;
                // Score, top-k, page list and attention over bounds `m` (either format).
                let select_and_attend = |m: &Tensor| -> Result<()> {
                    let s = ops::quest_page_scores(&q, m, &cand, 1, 2)?;
                    let sel = ops::topk_indices(&s.reshape((b * HKV, np))?, kpages)?.reshape((b, HKV, kpages))?;
                    let pages = spinkv::ops::selection_to_pages(&cand, &sel)?;
                    let list = PageList {
                        pages,
                        queries: queries.clone(),
                        kv_limit: kv_limit.clone(),
                    };
                    ops::sparse_paged_attention(&q, &pool, &list, scale)?;
                    Ok(())
                };
                let step = || -> Result<()> {
                    ops::paged_append(&pool, &knew, &vnew, &dst)?;
                    ops::quest_meta_update(&meta, &knew, &dst, P)?;
                    select_and_attend(&meta)
                };
                // The same step with the fused append + min/max kernel (what SpinCache runs).
                let step_fused = || -> Result<()> {
                    ops::paged_append_with_minmax(&pool, &knew, &vnew, &dst, &meta, &dst)?;
                    select_and_attend(&meta)
                };
                // The fused step with int8 bounds.
                let step_q8 = || -> Result<()> {
                    ops::paged_append_with_minmax(&pool, &knew, &vnew, &dst, &meta8, &dst)?;
                    select_and_attend(&meta8)
                };
                // Append bytes: K/V rows read and written, metadata rows read and written.
                let append_bytes = (b * HKV * (4 * D * 2 + 2 * META_BYTES)) as f64;
                let step_bytes = meta_bytes + sel_bytes;
                measure(
                    &mut rows,
                    &timer,
                    "quest step (eager)",
                    l,
                    b,
                    iters,
                    step_bytes,
                    anchor("step", l, b),
                    &mut || {
                        step()?;
                        Ok(())
                    },
                );
                // Replays from CUDA graphs: the GPU time without host launch overhead.
                let graphs: [GraphCase; 11] = [
                    ("append + min/max, two kernels (graph)", None, append_bytes, &|| {
                        ops::paged_append(&pool, &knew, &vnew, &dst)?;
                        ops::quest_meta_update(&meta, &knew, &dst, P)?;
                        Ok(())
                    }),
                    ("append + min/max, fused (graph)", None, append_bytes, &|| {
                        ops::paged_append_with_minmax(&pool, &knew, &vnew, &dst, &meta, &dst)?;
                        Ok(())
                    }),
                    ("sparse attention (graph)", Some("sparse"), sel_bytes, &|| {
                        ops::sparse_paged_attention(&q, &pool, &sparse_list, scale)?;
                        Ok(())
                    }),
                    ("quest score + top-k (graph)", None, meta_bytes, &|| {
                        let s = ops::quest_page_scores(&q, &meta, &cand, 1, 2)?;
                        ops::topk_indices(&s.reshape((b * HKV, np))?, kpages)?;
                        Ok(())
                    }),
                    ("quest score only (graph)", None, meta_bytes, &|| {
                        ops::quest_page_scores(&q, &meta, &cand, 1, 2)?;
                        Ok(())
                    }),
                    ("quest score only, int8 bounds (graph)", None, meta8_bytes, &|| {
                        ops::quest_page_scores(&q, &meta8, &cand, 1, 2)?;
                        Ok(())
                    }),
                    ("quest score + top-k, int8 bounds (graph)", None, meta8_bytes, &|| {
                        let s = ops::quest_page_scores(&q, &meta8, &cand, 1, 2)?;
                        ops::topk_indices(&s.reshape((b * HKV, np))?, kpages)?;
                        Ok(())
                    }),
                    ("quest step (graph)", Some("step"), step_bytes, &|| {
                        step()?;
                        Ok(())
                    }),
                    (
                        "quest step (graph), fused append, int8 bounds",
                        Some("step"),
                        meta8_bytes + sel_bytes,
                        &|| {
                            step_q8()?;
                            Ok(())
                        },
                    ),
                    ("quest step (graph), fused append", Some("step"), step_bytes, &|| {
                        step_fused()?;
                        Ok(())
                    }),
                    (
                        "quest step (graph), contiguous metadata",
                        Some("step"),
                        step_bytes,
                        &|| {
                            ops::paged_append(&pool, &knew, &vnew, &dst)?;
                            ops::quest_meta_update(&meta, &knew, &dst, P)?;
                            let s = ops::quest_page_scores(&q, &meta, &cand_seq, 1, 2)?;
                            let sel =
                                ops::topk_indices(&s.reshape((b * HKV, np))?, kpages)?.reshape((b, HKV, kpages))?;
                            let pages = spinkv::ops::selection_to_pages(&cand, &sel)?;
                            let list = PageList {
                                pages,
                                queries: queries.clone(),
                                kv_limit: kv_limit.clone(),
                            };
                            ops::sparse_paged_attention(&q, &pool, &list, scale)?;
                            Ok(())
                        },
                    ),
                ];
                for (what, anchor_kind, bytes, f) in graphs {
                    match capture(&dev, &stream, f) {
                        Ok(g) => measure(
                            &mut rows,
                            &timer,
                            what,
                            l,
                            b,
                            iters,
                            bytes,
                            anchor_kind.and_then(|k| anchor(k, l, b)),
                            &mut || {
                                g.launch()?;
                                Ok(())
                            },
                        ),
                        Err(e) => println!("FAILED capture of {what} L={l} B={b}: {e:?}"),
                    }
                    stream.synchronize()?;
                }
                println!("done L={l} B={b}");
            }
        }

        let gbs = |row: &Row| row.bytes / (row.us * 1e-6) / 1e9;
        let floor = |row: &Row| row.bytes / bw * 1e6;
        let mut out = String::new();
        out.push_str(&format!(
            "HBM copy bandwidth (floor reference): {:.0} GB/s\n\n",
            bw / 1e9
        ));
        out.push_str("| version | context | batch | time (µs) | bytes (MB) | GB/s | floor (µs) | % of floor | PyTorch anchor (µs) |\n");
        out.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        for row in &rows {
            out.push_str(&format!(
                "| {} | {}K | {} | {:.1} | {:.1} | {:.0} | {:.1} | {:.0}% | {} |\n",
                row.what,
                row.l / 1024,
                row.b,
                row.us,
                row.bytes / 1e6,
                gbs(row),
                floor(row),
                100.0 * floor(row) / row.us,
                row.anchor.map(|a| format!("{a:.1}")).unwrap_or_else(|| "–".into())
            ));
        }
        println!("\n{out}");
        if let Some(path) = csv {
            let mut s = String::from("what,context,batch,us,bytes,gbps,floor_us\n");
            for row in &rows {
                s.push_str(&format!(
                    "\"{}\",{},{},{:.3},{},{:.1},{:.3}\n",
                    row.what.trim(),
                    row.l,
                    row.b,
                    row.us,
                    row.bytes,
                    gbs(row),
                    floor(row)
                ));
            }
            std::fs::write(path, s)?;
        }
        Ok(())
    }
}
