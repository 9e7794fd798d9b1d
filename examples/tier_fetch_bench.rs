//! Batched miss fetch from the pinned host tier on the GPU: `n` scattered pages of a
//! large pinned pool copied into the fast tier by (a) one `cuMemcpyHtoDAsync` per page,
//! (b) one gather kernel launch reading mapped pinned memory (`PinnedPagePool::gather_into`),
//! next to (c) one bulk copy of the same bytes from a contiguous pinned buffer (the PCIe
//! ceiling). Prints GB/s of page bytes moved.
//!
//! `cargo run --release --features cuda --example tier_fetch_bench [-- --host-gib 4]`

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!(
        "tier_fetch_bench needs the `cuda` feature: cargo run --release --features cuda --example tier_fetch_bench"
    );
}

#[cfg(feature = "cuda")]
fn main() -> anyhow::Result<()> {
    bench::main()
}

#[cfg(feature = "cuda")]
mod bench {
    use anyhow::Result;
    use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaStream};
    use candle_core::{DType, Device, Tensor};
    use spinkv::tiered::PinnedPagePool;
    use std::sync::Arc;

    fn time_us(stream: &Arc<CudaStream>, reps: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        f()?;
        stream.synchronize()?;
        let ctx = stream.context();
        let mut v = Vec::new();
        for _ in 0..reps {
            let e0 = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            let e1 = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            e0.record(stream)?;
            f()?;
            e1.record(stream)?;
            e1.synchronize()?;
            v.push(e0.elapsed_ms(&e1)? as f64 * 1000.0);
        }
        v.sort_by(|a, b| a.total_cmp(b));
        Ok(v[v.len() / 2])
    }

    pub fn main() -> Result<()> {
        let host_gib: f64 = std::env::args()
            .skip_while(|a| a != "--host-gib")
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(4.0);
        let dev = Device::new_cuda(0)?;
        let cuda = match &dev {
            Device::Cuda(c) => c.clone(),
            _ => unreachable!(),
        };
        let stream = cuda.cuda_stream();
        println!("tier fetch: scattered pages from a {host_gib} GiB pinned pool into HBM (median of 9)");
        println!(
            "{:>9} {:>7} {:>12} | {:>14} {:>14} {:>14}",
            "page", "pages", "MiB", "memcpy/page", "gather kernel", "bulk copy"
        );
        for (page_tokens, head_dim) in [(16usize, 64usize), (16, 128), (32, 128)] {
            let page_bytes = 2 * page_tokens * head_dim * 2;
            let host_slots = ((host_gib * (1u64 << 30) as f64) as usize / page_bytes).max(1);
            let pool = PinnedPagePool::new(&dev, host_slots, page_tokens, head_dim, DType::BF16)?;
            for n in [256usize, 2048, 16384] {
                let fast_slots = n;
                let fast = Tensor::zeros((fast_slots, 2, page_tokens, head_dim), DType::BF16, &dev)?;
                // Scattered sources over the whole pool (a multiplicative walk), distinct.
                let mut pairs = Vec::with_capacity(2 * n);
                for i in 0..n as u64 {
                    pairs.push(((i * 2_654_435_761) % host_slots as u64) as u32);
                    pairs.push(i as u32);
                }
                let pairs_gpu = Tensor::from_vec(pairs.clone(), (n, 2), &dev)?;
                let mib = (n * page_bytes) as f64 / (1 << 20) as f64;
                let gbs = |us: f64| (n * page_bytes) as f64 / us / 1e3;
                // (a) one async memcpy per page into a plain device buffer.
                let dst = unsafe { cuda.alloc::<u8>(n * page_bytes)? };
                let dst_ptr = {
                    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
                    let (p, _g) = dst.device_ptr(&stream);
                    p
                };
                let host_base = pool_host_ptr(&pool)?;
                let per_page = time_us(&stream, 9, &mut || {
                    for (i, p) in pairs.chunks(2).enumerate() {
                        let src = host_base + p[0] as usize * page_bytes;
                        unsafe {
                            sys::cuMemcpyHtoDAsync_v2(
                                dst_ptr + (i * page_bytes) as u64,
                                src as *const std::ffi::c_void,
                                page_bytes,
                                stream.cu_stream(),
                            )
                            .result()?;
                        }
                    }
                    Ok(())
                })?;
                // (b) one gather launch.
                let gather = time_us(&stream, 9, &mut || Ok(pool.gather_into(&fast, &pairs_gpu)?))?;
                // (c) one bulk copy of the same bytes.
                let bulk = time_us(&stream, 9, &mut || {
                    unsafe {
                        result::memcpy_htod_async(
                            dst_ptr,
                            std::slice::from_raw_parts(host_base as *const u8, n * page_bytes),
                            stream.cu_stream(),
                        )?;
                    }
                    Ok(())
                })?;
                println!(
                    "{:>6} KiB {:>7} {:>12.1} | {:>8.1} GB/s {:>8.1} GB/s {:>8.1} GB/s",
                    page_bytes / 1024,
                    n,
                    mib,
                    gbs(per_page),
                    gbs(gather),
                    gbs(bulk)
                );
            }
        }
        Ok(())
    }

    /// Host address of the pool's first byte (read back through one page).
    fn pool_host_ptr(pool: &PinnedPagePool) -> Result<usize> {
        Ok(pool.host_ptr() as usize)
    }
}
