//! The pinned, mapped host tier on CUDA: pages written from the host are gathered by one
//! kernel launch into a poisoned fast-tier pool on the GPU and must equal the CPU
//! reference (`ops::copy_pages` on CPU tensors) bit for bit, in f32, f16 and bf16, with
//! odd page shapes; bad arguments are errors naming the op.
//!
//! The sync-free decode pieces: `gather_counted` (count on the device; rows past it are
//! garbage and must not be copied), `append_rows` (K/V rows written into the host pages
//! by a kernel; bit-exact against the CPU `paged_append`), and `attend` (sparse paged
//! attention over host pages; equal to the same op over the pool as a GPU tensor, and
//! within the tolerances of tests/cuda_ops.rs of the CPU op; an all-NONE list gives
//! `EMPTY_LSE` and merges away). The tests written for them skip when no GPU is present.
//! And `ops::StagedUpload`: back-to-back writes through its pinned staging land in order;
//! `ops::Mailbox`: staged words loaded eagerly and by a replayed graph land in order.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use rand::seq::SliceRandom;
use rand::Rng;
use spinkv::ops::{self, copy_pages, PageList, EMPTY_LSE, NONE};
use spinkv::tiered::PinnedPagePool;

/// The GPU, or `None` (the test then returns early) when there is none.
fn gpu_or_skip() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => {
            spinkv::ops::set_poison_outputs(true);
            Some(d)
        }
        Err(e) => {
            eprintln!("skipping: no CUDA device ({e})");
            None
        }
    }
}

/// A pinned pool with random pages, and the same pages as a CPU tensor.
fn random_pool(gpu: &Device, seed: u64, slots: usize, page: usize, d: usize, dtype: DType) -> (PinnedPagePool, Tensor) {
    let mut r = rng(seed);
    let host = randn(&mut r, &[slots, 2, page, d], 1.0).to_dtype(dtype).unwrap();
    let mut pool = PinnedPagePool::new(gpu, slots, page, d, dtype).unwrap();
    let all: Vec<u32> = (0..slots as u32).collect();
    pool.write_pages(&all, &host).unwrap();
    (pool, host)
}

#[test]
fn gather_counted_copies_only_the_counted_pairs() {
    let Some(gpu) = gpu_or_skip() else { return };
    for (dtype, page, d) in [(DType::F32, 16, 72), (DType::BF16, 5, 24), (DType::F16, 16, 128)] {
        let (host_slots, fast_slots, cap) = (211, 97, 61);
        let (pool, host) = random_pool(&gpu, (page * 7 + d) as u64, host_slots, page, d, dtype);
        let mut r = rng(d as u64);
        let mut dsts: Vec<u32> = (0..fast_slots as u32).collect();
        dsts.shuffle(&mut r);
        // Every row is a plausible pair (distinct destinations), so a copied garbage row
        // would show; a few garbage rows are NONE or out of range.
        let mut pairs = Vec::new();
        for (i, &dst) in dsts.iter().take(cap).enumerate() {
            let src = r.random_range(0..host_slots as u32);
            match i % 17 {
                16 => pairs.extend([NONE, dst]),
                15 => pairs.extend([src, NONE]),
                _ => pairs.extend([src, dst]),
            }
        }
        let poison = Tensor::full(f32::NAN, (fast_slots, 2, page, d), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let pairs_gpu = Tensor::from_vec(pairs.clone(), (cap, 2), &gpu).unwrap();
        for count in [0u32, 1, 14, 37, cap as u32, 1000] {
            let fast = poison.to_device(&gpu).unwrap();
            let count_gpu = Tensor::from_vec(vec![count], 1, &gpu).unwrap();
            pool.gather_counted(&fast, &pairs_gpu, &count_gpu).unwrap();
            let n = (count as usize).min(cap);
            let want = poison.copy().unwrap();
            for p in pairs[..2 * n].chunks(2) {
                if p[0] != NONE && p[1] != NONE {
                    want.slice_set(&host.narrow(0, p[0] as usize, 1).unwrap(), 0, p[1] as usize)
                        .unwrap();
                }
            }
            assert_eq!(bits(&fast), bits(&want), "{dtype:?} page {page} d {d} count {count}");
        }
    }
}

#[test]
fn append_rows_into_pinned_pages_equals_cpu_paged_append() {
    let Some(gpu) = gpu_or_skip() else { return };
    for (dtype, page, d, t, h) in [
        (DType::F32, 16, 72, 13, 3),
        (DType::BF16, 5, 24, 29, 2),
        (DType::F16, 16, 128, 7, 5),
        (DType::BF16, 16, 64, 1, 1),
    ] {
        let slots = 37;
        let (mut pool, host) = random_pool(&gpu, (t * 100 + d) as u64, slots, page, d, dtype);
        let mut r = rng(t as u64 + 3);
        let k = randn(&mut r, &[t, h, d], 1.0).to_dtype(dtype).unwrap();
        let v = randn(&mut r, &[t, h, d], 1.0).to_dtype(dtype).unwrap();
        // Distinct destinations, some NONE.
        let mut codes: Vec<u32> = (0..(slots * page) as u32).collect();
        codes.shuffle(&mut r);
        let dst: Vec<u32> = codes[..t * h]
            .iter()
            .enumerate()
            .map(|(i, &c)| if i % 5 == 3 { NONE } else { c })
            .collect();
        let dst_c = Tensor::from_vec(dst, (t, h), &Device::Cpu).unwrap();
        pool.append_rows(
            &k.to_device(&gpu).unwrap(),
            &v.to_device(&gpu).unwrap(),
            &dst_c.to_device(&gpu).unwrap(),
        )
        .unwrap();
        let want = host.copy().unwrap();
        ops::paged_append(&want, &k, &v, &dst_c).unwrap();
        gpu.synchronize().unwrap();
        let all: Vec<u32> = (0..slots as u32).collect();
        let got = pool.read_pages(&all).unwrap();
        assert_eq!(bits(&got), bits(&want), "{dtype:?} page {page} d {d} t {t} h {h}");
    }
}

/// Page lists over `lens` tokens per sequence: a random subset of each (sequence, KV
/// head)'s pages in random order with a NONE hole, NONE padding; queries at the last
/// position and one earlier position per sequence.
fn random_list(r: &mut rand::rngs::StdRng, slots: usize, page: usize, hkv: usize, lens: &[usize]) -> PageList {
    let s = lens.len();
    let mut free: Vec<u32> = (0..slots as u32).collect();
    free.shuffle(r);
    let mut lists = Vec::new();
    for &l in lens {
        for _ in 0..hkv {
            let np = l.div_ceil(page);
            let mut order: Vec<u32> = (0..np as u32).collect();
            order.shuffle(r);
            let keep = r.random_range(1..=np);
            let mut list: Vec<(u32, u32)> = order[..keep].iter().map(|&lp| (free.pop().unwrap(), lp)).collect();
            if list.len() > 2 {
                list.insert(1, (NONE, 0));
            }
            lists.push(list);
        }
    }
    let n = lists.iter().map(Vec::len).max().unwrap_or(0) + 1;
    let mut pages = vec![NONE; s * hkv * n * 2];
    for (i, list) in lists.iter().enumerate() {
        for (j, &(slot, lp)) in list.iter().enumerate() {
            pages[(i * n + j) * 2] = slot;
            pages[(i * n + j) * 2 + 1] = lp;
        }
    }
    let mut queries = Vec::new();
    for (si, &l) in lens.iter().enumerate() {
        queries.extend([si as u32, (l - 1) as u32]);
        queries.extend([si as u32, r.random_range(0..l as u32)]);
    }
    let t = queries.len() / 2;
    let kv_limit: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
    PageList {
        pages: Tensor::from_vec(pages, (s, hkv, n, 2), &Device::Cpu).unwrap(),
        queries: Tensor::from_vec(queries, (t, 2), &Device::Cpu).unwrap(),
        kv_limit: Tensor::from_vec(kv_limit, s, &Device::Cpu).unwrap(),
    }
}

fn list_to(list: &PageList, dev: &Device) -> PageList {
    PageList {
        pages: list.pages.to_device(dev).unwrap(),
        queries: list.queries.to_device(dev).unwrap(),
        kv_limit: list.kv_limit.to_device(dev).unwrap(),
    }
}

#[test]
fn attend_over_pinned_pages_equals_sparse_paged_attention() {
    let Some(gpu) = gpu_or_skip() else { return };
    for (dtype, hq, hkv, d, page) in [
        (DType::BF16, 8, 2, 128, 16),
        (DType::F16, 12, 4, 64, 8),
        (DType::F32, 6, 2, 72, 16),
        (DType::BF16, 3, 1, 40, 5),
    ] {
        let lens: [usize; 4] = [5 * page + 3, 1, 77, 2 * page];
        let slots = lens.iter().map(|l| l.div_ceil(page)).sum::<usize>() * hkv + 3;
        let (pool, host) = random_pool(&gpu, (hq * 1000 + d) as u64, slots, page, d, dtype);
        let mut r = rng(hq as u64 * 13 + d as u64);
        let list_c = random_list(&mut r, slots, page, hkv, &lens);
        let list_g = list_to(&list_c, &gpu);
        let t = list_c.queries.dims()[0];
        let q = randn(&mut r, &[t, hq, d], 1.0).to_dtype(dtype).unwrap();
        let q_g = q.to_device(&gpu).unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        let got = pool.attend(&q_g, &list_g, scale).unwrap();
        let on_gpu = ops::sparse_paged_attention(&q_g, &host.to_device(&gpu).unwrap(), &list_g, scale).unwrap();
        let on_cpu = ops::sparse_paged_attention(&q, &host, &list_c, scale).unwrap();
        let what = format!("{dtype:?} hq {hq} hkv {hkv} d {d} page {page}");
        // The same kernels over the same bytes: equal to the GPU-tensor pool.
        assert_eq!(f32s(&got.out), f32s(&on_gpu.out), "{what}: out vs GPU pool");
        assert_eq!(f32s(&got.lse), f32s(&on_gpu.lse), "{what}: lse vs GPU pool");
        let tol = match dtype {
            DType::F32 => 1e-4,
            DType::F16 => 4e-3,
            _ => 1.5e-2,
        };
        for (i, (g, w)) in f32s(&got.out).iter().zip(f32s(&on_cpu.out)).enumerate() {
            assert!((g - w).abs() <= tol, "{what}: out[{i}] pinned {g} cpu {w}");
        }
        for (i, (g, w)) in f32s(&got.lse).iter().zip(f32s(&on_cpu.lse)).enumerate() {
            assert!(
                (g - w).abs() <= 1e-3 * (1.0 + w.abs()),
                "{what}: lse[{i}] pinned {g} cpu {w}"
            );
        }
        // Nothing listed: every row empty, and merging it changes nothing.
        let empty = PageList {
            pages: Tensor::full(NONE, list_g.pages.dims(), &gpu).unwrap(),
            ..list_g.clone()
        };
        let none = pool.attend(&q_g, &empty, scale).unwrap();
        assert!(f32s(&none.lse).iter().all(|&x| x == EMPTY_LSE), "{what}: empty lse");
        let merged = ops::merge_partials(&got, &none).unwrap();
        for (g, w) in f32s(&merged.out).iter().zip(f32s(&got.out)) {
            assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{what}: merge out {g} vs {w}");
        }
        for (g, w) in f32s(&merged.lse).iter().zip(f32s(&got.lse)) {
            assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{what}: merge lse {g} vs {w}");
        }
    }
}

#[test]
fn sync_free_pieces_reject_bad_arguments() {
    let Some(gpu) = gpu_or_skip() else { return };
    let mut pool = PinnedPagePool::new(&gpu, 4, 16, 64, DType::F32).unwrap();
    let fast = Tensor::zeros((4, 2, 16, 64), DType::F32, &gpu).unwrap();
    let pairs = Tensor::zeros((3, 2), DType::U32, &gpu).unwrap();
    let e = pool
        .gather_counted(&fast, &pairs, &Tensor::zeros(2, DType::U32, &gpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("gather_counted") && e.contains("count"), "{e}");
    let k = Tensor::zeros((2, 1, 32), DType::F32, &gpu).unwrap();
    let dst = Tensor::zeros((2, 1), DType::U32, &gpu).unwrap();
    let e = pool.append_rows(&k, &k, &dst).unwrap_err().to_string();
    assert!(e.contains("append_rows") && e.contains("[2, 1, 32]"), "{e}");
    let k = Tensor::zeros((2, 1, 64), DType::F32, &Device::Cpu).unwrap();
    let e = pool
        .append_rows(&k, &k, &dst.to_device(&Device::Cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("append_rows"), "{e}");
    let q = Tensor::zeros((1, 2, 32), DType::F32, &gpu).unwrap();
    let list = PageList {
        pages: Tensor::full(NONE, (1, 1, 2, 2), &gpu).unwrap(),
        queries: Tensor::zeros((1, 2), DType::U32, &gpu).unwrap(),
        kv_limit: Tensor::zeros(1, DType::U32, &gpu).unwrap(),
    };
    let e = pool.attend(&q, &list, 1.0).unwrap_err().to_string();
    assert!(e.contains("attend") && e.contains("[1, 2, 32]"), "{e}");
}

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
    // Sizes whose product overflows are errors, not a wrapped (tiny) allocation that the
    // kernels would index beyond: 2^62 · 2 · 2 · 4 bytes wraps to 0.
    for (slots, page, d) in [(1, 1 << 62, 2), (1 << 20, 1 << 20, 1 << 20), (1, 1, 1 << 61)] {
        let e = PinnedPagePool::new(&gpu, slots, page, d, DType::F32)
            .map(|p| p.bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("PinnedPagePool") && e.contains("overflow"), "{e}");
    }
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

/// `&PinnedPagePool` may be shared between threads (its `&self` methods only read).
#[allow(dead_code)]
fn pinned_pool_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<PinnedPagePool>();
}

#[test]
fn dropping_the_pool_waits_for_its_kernels() {
    let Some(gpu) = gpu_or_skip() else { return };
    // A gather large enough to still run when the pool is dropped right after enqueuing
    // it: the drop must wait for the stream before unpinning and freeing the pages.
    let (slots, page, d) = (4096, 16, 128);
    let (pool, host) = random_pool(&gpu, 77, slots, page, d, DType::F32);
    let fast = Tensor::zeros((slots, 2, page, d), DType::F32, &gpu).unwrap();
    let pairs: Vec<u32> = (0..slots as u32).flat_map(|s| [s, slots as u32 - 1 - s]).collect();
    let pairs = Tensor::from_vec(pairs, (slots, 2), &gpu).unwrap();
    pool.gather_into(&fast, &pairs).unwrap();
    drop(pool);
    let got = fast.to_device(&Device::Cpu).unwrap();
    let idx: Vec<u32> = (0..slots as u32).rev().collect();
    let want = host
        .index_select(&Tensor::from_vec(idx, slots, &Device::Cpu).unwrap(), 0)
        .unwrap();
    assert_eq!(bits(&got), bits(&want), "pages gathered from a pool dropped mid-flight");
    if let Device::Cuda(c) = &gpu {
        c.cuda_stream().context().check_err().unwrap();
    }
}

/// `ops::StagedUpload` on CUDA: many writes back to back with no synchronization (each
/// must wait for the previous copy to have read the staging words before overwriting
/// them), of varying lengths (the staging buffer grows from 16 words), into a view at an
/// offset of a poisoned buffer; the words past each write stay.
#[test]
fn staged_uploads_back_to_back_land_in_order() {
    let Some(dev) = gpu_or_skip() else { return };
    let n = 4099;
    let dst = Tensor::full(NONE, n + 5, &dev).unwrap();
    let view = dst.narrow(0, 3, n).unwrap();
    let mut up = ops::StagedUpload::new("test upload", 16, &dev).unwrap();
    let len = |k: u32| [n, 5, 1000, n - 1][k as usize % 4];
    let words = |k: u32| -> Vec<u32> { (0..len(k) as u32).map(|i| i.wrapping_mul(2654435761) ^ k).collect() };
    // Each write is followed by a device copy of the buffer, so every write's words are
    // read by the stream before the next write lands; the host keeps what it wrote.
    let mut want = vec![NONE; n];
    let mut seen = Vec::new();
    for k in 0..16 {
        let w = words(k);
        up.write(&view, &w).unwrap();
        want[..w.len()].copy_from_slice(&w);
        seen.push((view.copy().unwrap(), want.clone()));
    }
    for (k, (t, want)) in seen.iter().enumerate() {
        assert_eq!(&t.to_vec1::<u32>().unwrap(), want, "write {k}");
    }
    let all = dst.to_vec1::<u32>().unwrap();
    assert!(
        all[..3].iter().chain(&all[3 + n..]).all(|&x| x == NONE),
        "outside the view untouched"
    );
    let e = up.write(&view, &vec![1; n + 1]).unwrap_err().to_string();
    assert!(e.contains("test upload") && e.contains("n >= 4100"), "{e}");
    let cpu = Tensor::zeros(n, DType::U32, &Device::Cpu).unwrap();
    assert!(up.write(&cpu, &words(0)).is_err(), "a CUDA upload refuses a CPU buffer");
}

/// `ops::Mailbox` on CUDA: words staged on the host and copied by a load enqueued later,
/// eagerly and inside a captured graph replayed with no host synchronization between
/// steps. Each load reads the words staged before it: staging again waits for the last
/// copy, through the event recorded after it (by the graph itself at a replay). Into a
/// view at an offset of a poisoned buffer; bad input is an error naming the mailbox.
#[test]
fn mailbox_loads_land_in_order_eager_and_replayed() {
    let Some(dev) = gpu_or_skip() else { return };
    let n = 3001;
    let dst = Tensor::full(NONE, n + 5, &dev).unwrap();
    let view = dst.narrow(0, 3, n).unwrap();
    let mut mb = ops::Mailbox::new("test mailbox", n, &dev).unwrap();
    let words = |k: u32| -> Vec<u32> { (0..n as u32).map(|i| i.wrapping_mul(2654435761) ^ k).collect() };
    // Each load is followed by a device copy of the view, enqueued before the next stage.
    let mut seen = Vec::new();
    for k in 0..8 {
        mb.stage(&words(k)).unwrap();
        mb.load(&view).unwrap();
        seen.push((k, view.copy().unwrap()));
    }
    mb.stage(&words(100)).unwrap();
    ops::StepGraph::warm_up(&dev, || mb.load(&view)).unwrap();
    let (graph, ()) = ops::StepGraph::capture(&dev, || mb.load(&view)).unwrap();
    for k in 200..232 {
        mb.stage(&words(k)).unwrap();
        graph.launch().unwrap();
        seen.push((k, view.copy().unwrap()));
    }
    for (k, t) in &seen {
        assert_eq!(t.to_vec1::<u32>().unwrap(), words(*k), "load {k}");
    }
    let all = dst.to_vec1::<u32>().unwrap();
    assert!(
        all[..3].iter().chain(&all[3 + n..]).all(|&x| x == NONE),
        "outside the view untouched"
    );
    let e = mb.stage(&vec![1; n + 1]).unwrap_err().to_string();
    assert!(e.contains("test mailbox") && e.contains("mailbox of 3001"), "{e}");
    let short = dst.narrow(0, 0, n - 1).unwrap();
    let e = mb.load(&short).unwrap_err().to_string();
    assert!(e.contains("test mailbox") && e.contains("[3000]"), "{e}");
    let cpu = Tensor::zeros(n, DType::U32, &Device::Cpu).unwrap();
    assert!(mb.load(&cpu).is_err(), "a CUDA mailbox refuses a CPU buffer");
}
