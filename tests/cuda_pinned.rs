//! The pinned, mapped host tier on CUDA: pages written from the host are gathered by one
//! kernel launch into a poisoned fast-tier pool on the GPU and must equal the CPU
//! reference (`ops::copy_pages` on CPU tensors) bit for bit, in f32, f16 and bf16, with
//! odd page shapes; bad arguments are errors naming the op.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use spinkv::cuda::PinnedPagePool;
use spinkv::ops::copy_pages;

#[test]
fn gather_from_pinned_memory_equals_the_cpu_copy() {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    for (dtype, page, d) in [
        (DType::F32, 16, 128),
        (DType::BF16, 16, 64),
        (DType::F16, 8, 72),
        (DType::BF16, 5, 24),
    ] {
        let (host_slots, fast_slots, n) = (300, 96, 70);
        let mut r = rng(page as u64 * 31 + d as u64);
        let host = randn(&mut r, &[host_slots, 2, page, d], 1.0).to_dtype(dtype).unwrap();
        let mut pool = PinnedPagePool::new(&gpu, host_slots, page, d, dtype).unwrap();
        let all: Vec<u32> = (0..host_slots as u32).collect();
        pool.write_pages(&all, &host).unwrap();
        assert_eq!(
            max_abs_diff(&pool.read_pages(&all).unwrap(), &host),
            0.0,
            "host round trip"
        );
        // Scattered sources, distinct destinations.
        let mut pairs = Vec::new();
        for i in 0..n as u32 {
            pairs.push((i * 37 + 11) % host_slots as u32);
            pairs.push((i * 13 + 5) % fast_slots as u32);
        }
        pairs.truncate(2 * fast_slots.min(n));
        let np = pairs.len() / 2;
        // Poison: NaN everywhere, so an unwritten element shows.
        let poison = Tensor::full(f32::NAN, (fast_slots, 2, page, d), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let fast_gpu = poison.to_device(&gpu).unwrap();
        let pairs_gpu = Tensor::from_vec(pairs.clone(), (np, 2), &gpu).unwrap();
        pool.gather_into(&fast_gpu, &pairs_gpu).unwrap();
        let fast_cpu = poison.copy().unwrap();
        copy_pages(
            &fast_cpu,
            &host,
            &Tensor::from_vec(pairs.clone(), (np, 2), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let got = fast_gpu.to_device(&Device::Cpu).unwrap();
        // Compare only the destinations (the rest stays NaN in both).
        for p in pairs.chunks(2) {
            let a = got.get(p[1] as usize).unwrap();
            let b = fast_cpu.get(p[1] as usize).unwrap();
            assert_eq!(
                max_abs_diff(&a, &b),
                0.0,
                "{dtype:?} page {page} d {d}: slot {} → {}",
                p[0],
                p[1]
            );
        }
    }
}

#[test]
fn pinned_pool_bad_arguments_are_errors() {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let e = PinnedPagePool::new(&Device::Cpu, 4, 16, 64, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("PinnedPagePool") && e.contains("CUDA"), "{e}");
    assert!(PinnedPagePool::new(&gpu, 4, 16, 64, DType::U32).is_err());
    let mut pool = PinnedPagePool::new(&gpu, 4, 16, 64, DType::F32).unwrap();
    let e = pool
        .write_pages(&[9], &Tensor::zeros((1, 2, 16, 64), DType::F32, &Device::Cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("slot 9 out of range"), "{e}");
    let fast = Tensor::zeros((4, 2, 16, 32), DType::F32, &gpu).unwrap();
    let pairs = Tensor::zeros((1, 2), DType::U32, &gpu).unwrap();
    let e = pool.gather_into(&fast, &pairs).unwrap_err().to_string();
    assert!(e.contains("gather_into") && e.contains("[4, 2, 16, 32]"), "{e}");
}
