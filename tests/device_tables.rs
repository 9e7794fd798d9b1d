//! The device mirror of the two-level page tables: `page_slots` must return exactly what
//! `PageTables::get` returns for every (sequence, directory, page) of random tables built
//! with appends, pops, removals and leaf reuse, and `NONE` for out-of-range queries — on
//! the CPU (the reference op) and, with the `cuda` feature, on the GPU.

use candle_core::{Device, Tensor};
use spinkv::meta::{DeviceTables, PageTables, LEAF_PAGES};
use spinkv::ops::NONE;

fn random_tables(seed: u64) -> PageTables {
    let mut s = seed | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let (layers, heads) = (3, 2);
    let mut t = PageTables::new(layers, heads);
    let mut slot = 0u32;
    for seq in 0..7u64 {
        t.add_sequence(seq);
        let pages = (next() % 200) as usize;
        for _ in 0..pages {
            let slots: Vec<u32> = (slot..slot + 6).collect();
            slot += 6;
            t.push_page(seq, &slots).unwrap();
        }
        if next() % 3 == 0 {
            t.pop_pages(seq, (next() % 70) as usize).unwrap();
        }
    }
    t.remove_sequence(2).unwrap();
    t.add_sequence(9); // reuses freed leaves
    for _ in 0..(LEAF_PAGES + 5) {
        let slots: Vec<u32> = (slot..slot + 6).collect();
        slot += 6;
        t.push_page(9, &slots).unwrap();
    }
    t
}

fn check(device: &Device) {
    for seed in [1u64, 5, 11] {
        let t = random_tables(seed);
        let dt = DeviceTables::upload(&t, device).unwrap();
        assert_eq!(dt.bytes(), DeviceTables::bytes_for(&t));
        let mut q = Vec::new();
        let mut want = Vec::new();
        for (seq, dirs, pages) in t.sequences() {
            for d in 0..dirs.len() {
                let row = dt.row(seq, d).unwrap();
                for p in 0..pages + 3 {
                    q.extend([row, p as u32]);
                    want.push(if p < pages { t.get(seq, d, p).unwrap() } else { NONE });
                }
            }
        }
        // Past the end of the directory matrix, NONE queries.
        q.extend([u32::MAX - 1, 0, NONE, 0, 0, NONE, 0, (LEAF_PAGES * 1000) as u32]);
        want.extend([NONE, NONE, NONE, NONE]);
        let n = want.len();
        let got = dt
            .lookup(&Tensor::from_vec(q, (n, 2), device).unwrap())
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        // Entries past a sequence's pages but inside its last leaf read NONE (unused).
        assert_eq!(got, want, "seed {seed} on {:?}", device.location());
    }
}

#[test]
fn device_tables_match_the_host_tables_on_cpu() {
    check(&Device::Cpu);
    assert!(DeviceTables::upload(&PageTables::new(1, 1), &Device::Cpu).is_ok());
    let e = spinkv::meta::page_slots(
        &Tensor::zeros((2, 2), candle_core::DType::U32, &Device::Cpu).unwrap(),
        &Tensor::zeros((2, 3), candle_core::DType::U32, &Device::Cpu).unwrap(),
        &Tensor::zeros((1, 2), candle_core::DType::U32, &Device::Cpu).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("page_slots") && e.contains("[2, 3]"), "{e}");
}

#[cfg(feature = "cuda")]
#[test]
fn device_tables_match_the_host_tables_on_cuda() {
    spinkv::cuda::set_poison_outputs(true);
    check(&Device::new_cuda(0).expect("a CUDA device"));
}
