//! The device mirror of the two-level page tables: `page_slots` must return exactly what
//! `PageTables::get` returns for every (sequence, directory, page) of random tables built
//! with appends, pops, removals and leaf reuse, and `NONE` for out-of-range queries — on
//! the CPU (the reference op) and, with the `cuda` feature, on the GPU.
//!
//! Incremental mirrors: after random add/push/pop/remove sequences on tracked
//! `PageTables`, with `DeviceTables::apply` called at random points, the preallocated
//! tables must give the same `page_slots` lookups as a fresh `upload` for every live
//! sequence's rows; capacity overflows are errors.
//!
//! The padded decode plan (`expand_decode_plan`) must give each (layer, row, head) the
//! slot `PageTables::get` holds for the row's position, on every device, over poisoned
//! words.

use candle_core::{Device, Tensor};
use spinkv::meta::{DeviceTables, PageTables, LEAF_PAGES};
use spinkv::ops::{expand_decode_plan, PlanWords, NONE};

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
        check_grid(&t, &dt, device, seed);
    }
}

/// `lookup_grid` (implicit pages 0..K, and explicit pages with NONE and out-of-range
/// entries) against `PageTables::get`, rows including a NONE and an out-of-range row; and
/// `lookup_grid_limited`, each row's pages cut at a token limit.
fn check_grid(t: &PageTables, dt: &DeviceTables, device: &Device, seed: u64) {
    let cpu = |x: Tensor| {
        x.to_device(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
    };
    let mut rows = Vec::new();
    let mut lens = Vec::new();
    for (seq, dirs, pages) in t.sequences() {
        for d in 0..dirs.len() {
            rows.push(dt.row(seq, d).unwrap());
            lens.push((seq, d, pages));
        }
    }
    rows.extend([NONE, u32::MAX - 1]);
    let g = rows.len();
    let k = 37;
    let slot = |i: usize, p: u32| match lens.get(i) {
        Some(&(seq, d, pages)) if p != NONE && (p as usize) < pages => t.get(seq, d, p as usize).unwrap(),
        _ => NONE,
    };
    let rt = Tensor::from_vec(rows.clone(), g, device).unwrap();
    let got = cpu(dt.lookup_grid(&rt, None, k).unwrap());
    let want: Vec<u32> = (0..g * k).map(|i| slot(i / k, (i % k) as u32)).collect();
    assert_eq!(got, want, "seed {seed} implicit grid on {:?}", device.location());
    let pages: Vec<u32> = (0..g * k)
        .map(|i| match i % 5 {
            0 => NONE,
            1 => (LEAF_PAGES * 1000) as u32,
            _ => ((i * 7919) % 260) as u32,
        })
        .collect();
    let pt = Tensor::from_vec(pages.clone(), (g, k), device).unwrap();
    let got = cpu(dt.lookup_grid(&rt, Some(&pt), k).unwrap());
    let want: Vec<u32> = (0..g * k).map(|i| slot(i / k, pages[i])).collect();
    assert_eq!(got, want, "seed {seed} explicit grid on {:?}", device.location());
    // Limited: pairs of grid rows share a token limit (0, odd counts, past every page);
    // their pages from ceil(limit / 8) on give NONE.
    let (group, p) = (2, 8);
    let g2 = g - g % group;
    let rt2 = Tensor::from_vec(rows[..g2].to_vec(), g2, device).unwrap();
    let limits: Vec<u32> = (0..g2 / group)
        .map(|j| [0, 1, 8, 9, 100, 5000][(j + seed as usize) % 6])
        .collect();
    let lt = Tensor::from_vec(limits.clone(), g2 / group, device).unwrap();
    let limit = spinkv::ops::GridLimit {
        tokens: &lt,
        group,
        page_size: p,
    };
    let cut = |i: usize, page: u32| {
        if page != NONE && page as usize * p >= limits[i / k / group] as usize {
            NONE
        } else {
            slot(i / k, page)
        }
    };
    let got = cpu(dt.lookup_grid_limited(&rt2, None, k, limit).unwrap());
    let want: Vec<u32> = (0..g2 * k).map(|i| cut(i, (i % k) as u32)).collect();
    assert_eq!(
        got,
        want,
        "seed {seed} limited implicit grid on {:?}",
        device.location()
    );
    let pt2 = Tensor::from_vec(pages[..g2 * k].to_vec(), (g2, k), device).unwrap();
    let got = cpu(dt.lookup_grid_limited(&rt2, Some(&pt2), k, limit).unwrap());
    let want: Vec<u32> = (0..g2 * k).map(|i| cut(i, pages[i])).collect();
    assert_eq!(
        got,
        want,
        "seed {seed} limited explicit grid on {:?}",
        device.location()
    );
    // A pages tensor of the wrong shape, or limits that do not cover the rows, are clear
    // errors naming the op.
    let bad = Tensor::from_vec(vec![0u32; g], g, device).unwrap();
    let e = dt.lookup_grid(&rt, Some(&bad), k).unwrap_err().to_string();
    assert!(e.contains("page_slots_grid"), "{e}");
    let short = spinkv::ops::GridLimit { group: 3, ..limit };
    let e = dt.lookup_grid_limited(&rt2, None, k, short).unwrap_err().to_string();
    assert!(e.contains("page_slots_grid") && e.contains("group 3"), "{e}");
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
    spinkv::ops::set_poison_outputs(true);
    check(&Device::new_cuda(0).expect("a CUDA device"));
}

/// Random add/push/pop/remove on `t`, mirrored into `dt` with `apply` at random points;
/// after each apply, every live sequence's lookups equal a fresh upload's.
fn check_incremental(device: &Device, seed: u64) {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let (layers, heads) = (2, 3);
    let dps = layers * heads;
    let mut t = PageTables::new(layers, heads);
    // Some content before tracking starts: the first apply must catch up.
    t.add_sequence(100);
    let mut slot = 0u32;
    for _ in 0..70 {
        t.push_page(100, &(slot..slot + dps as u32).collect::<Vec<_>>())
            .unwrap();
        slot += dps as u32;
    }
    let mut dt = DeviceTables::with_capacity(dps * 6, 5, 200, dps, device).unwrap();
    dt.add_sequence(100).unwrap();
    let mut live: Vec<u64> = vec![100];
    let mut next_seq = 0u64;
    for round in 0..60 {
        for _ in 0..(next() % 6) {
            match next() % 10 {
                0 | 1 if live.len() < 6 => {
                    t.add_sequence(next_seq);
                    dt.add_sequence(next_seq).unwrap();
                    live.push(next_seq);
                    next_seq += 1;
                }
                2 if !live.is_empty() => {
                    let seq = live.swap_remove((next() % live.len() as u64) as usize);
                    t.remove_sequence(seq).unwrap();
                    dt.remove_sequence(seq).unwrap();
                }
                3 | 4 if !live.is_empty() => {
                    let seq = live[(next() % live.len() as u64) as usize];
                    t.pop_pages(seq, (next() % 80) as usize).unwrap();
                }
                _ if !live.is_empty() => {
                    let seq = live[(next() % live.len() as u64) as usize];
                    for _ in 0..(next() % 90) {
                        if t.num_pages(seq).unwrap() >= 5 * LEAF_PAGES {
                            break;
                        }
                        t.push_page(seq, &(slot..slot + dps as u32).collect::<Vec<_>>())
                            .unwrap();
                        slot += dps as u32;
                    }
                }
                _ => {}
            }
        }
        if next() % 3 == 0 {
            continue; // let changes pile up across rounds
        }
        dt.apply(&mut t).unwrap();
        let fresh = DeviceTables::upload(&t, &Device::Cpu).unwrap();
        let (mut q_inc, mut q_fresh) = (Vec::new(), Vec::new());
        for &seq in &live {
            let pages = t.num_pages(seq).unwrap();
            for d in 0..dps {
                for p in 0..pages + LEAF_PAGES + 2 {
                    q_inc.extend([dt.row(seq, d).unwrap(), p as u32]);
                    q_fresh.extend([fresh.row(seq, d).unwrap(), p as u32]);
                }
            }
        }
        let n = q_inc.len() / 2;
        let got = dt
            .lookup(&Tensor::from_vec(q_inc, (n, 2), device).unwrap())
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        let want = fresh
            .lookup(&Tensor::from_vec(q_fresh, (n, 2), &Device::Cpu).unwrap())
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(got, want, "seed {seed} round {round} on {:?}", device.location());
    }
}

#[test]
fn incremental_device_tables_match_a_fresh_upload_on_cpu() {
    for seed in [3u64, 8, 21, 77] {
        check_incremental(&Device::Cpu, seed);
    }
}

#[test]
fn incremental_device_tables_capacity_errors() {
    let dev = Device::Cpu;
    assert!(DeviceTables::with_capacity(0, 1, 1, 1, &dev).is_err());
    let mut t = PageTables::new(1, 2);
    let mut dt = DeviceTables::with_capacity(4, 1, 2, 2, &dev).unwrap();
    t.add_sequence(1);
    assert_eq!(dt.add_sequence(1).unwrap(), 0);
    t.add_sequence(2);
    assert_eq!(dt.add_sequence(2).unwrap(), 2);
    let e = dt.add_sequence(3).unwrap_err().to_string();
    assert!(e.contains("add_sequence") && e.contains("no free rows"), "{e}");
    assert!(dt.add_sequence(2).is_err());
    // A sequence longer than one leaf per row.
    for p in 0..=LEAF_PAGES as u32 {
        t.push_page(1, &[p, p]).unwrap();
    }
    let e = dt.apply(&mut t).unwrap_err().to_string();
    assert!(e.contains("DeviceTables::apply") && e.contains("leaves per row"), "{e}");
    // The failed changes stay logged: shrinking and applying again succeeds.
    t.pop_pages(1, 1).unwrap();
    dt.apply(&mut t).unwrap();
    // The leaf arena (2 leaves) is full after sequence 1's two directories.
    t.push_page(2, &[5, 6]).unwrap();
    let e = dt.apply(&mut t).unwrap_err().to_string();
    assert!(e.contains("leaf arena"), "{e}");
    // Undone (the log now ends with a clear past the arena, a no-op), the next apply
    // succeeds and leaves every entry of sequence 1 as it was.
    t.pop_pages(2, 1).unwrap();
    dt.apply(&mut t).unwrap();
    let q: Vec<u32> = (0..LEAF_PAGES as u32).flat_map(|p| [1, p]).collect();
    let got = dt
        .lookup(&Tensor::from_vec(q, (LEAF_PAGES, 2), &dev).unwrap())
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    assert_eq!(got, (0..LEAF_PAGES as u32).collect::<Vec<_>>());
    // A sequence with pages but no rows.
    let mut t2 = PageTables::new(1, 2);
    t2.add_sequence(9);
    t2.push_page(9, &[1, 2]).unwrap();
    let mut dt2 = DeviceTables::with_capacity(4, 1, 4, 2, &dev).unwrap();
    let e = dt2.apply(&mut t2).unwrap_err().to_string();
    assert!(e.contains("add_sequence first"), "{e}");
    // Freed rows are reused.
    dt.remove_sequence(1).unwrap();
    assert_eq!(dt.add_sequence(3).unwrap(), 0);
    assert!(dt.remove_sequence(77).is_err());
}

#[cfg(feature = "cuda")]
#[test]
fn incremental_device_tables_match_a_fresh_upload_on_cuda() {
    let Ok(gpu) = Device::new_cuda(0) else {
        eprintln!("skipping: no CUDA device");
        return;
    };
    spinkv::ops::set_poison_outputs(true);
    for seed in [3u64, 8, 21, 77] {
        check_incremental(&gpu, seed);
    }
}

/// A write that fails on the device (an injected failure of either of the two fills, the
/// pairs' upload or the two scatters) keeps the change log: the next `apply` writes everything, and the
/// mirror matches.
#[cfg(feature = "fault-injection")]
#[test]
fn apply_keeps_its_change_log_when_a_scatter_fails() {
    use spinkv::fault;
    for nth in [1, 2, 3, 4, 5] {
        let mut t = PageTables::new(2, 2);
        let mut dt = DeviceTables::with_capacity(8, 4, 16, 4, &Device::Cpu).unwrap();
        // A sequence mirrored, then removed: its rows and leaves are filled by the apply
        // that fails, and their reuse by sequence 3 is scattered after the fills.
        t.add_sequence(9);
        dt.add_sequence(9).unwrap();
        for p in 0..8u32 {
            t.push_page(9, &[100 + 4 * p, 101 + 4 * p, 102 + 4 * p, 103 + 4 * p])
                .unwrap();
        }
        dt.apply(&mut t).unwrap();
        t.remove_sequence(9).unwrap();
        dt.remove_sequence(9).unwrap();
        t.add_sequence(3);
        dt.add_sequence(3).unwrap();
        for p in 0..5u32 {
            t.push_page(3, &[4 * p, 4 * p + 1, 4 * p + 2, 4 * p + 3]).unwrap();
        }
        fault::fail_nth_device_call(nth);
        let e = dt.apply(&mut t).unwrap_err().to_string();
        assert!(e.contains("DeviceTables::apply") && e.contains("injected"), "{e}");
        dt.apply(&mut t).unwrap();
        let mut q = Vec::new();
        let mut want = Vec::new();
        for d in 0..4 {
            for p in 0..5 {
                q.extend([dt.row(3, d).unwrap(), p as u32]);
                want.push(t.get(3, d, p).unwrap());
            }
            // Past sequence 3's pages: NONE, although sequence 9 held more there.
            q.extend([dt.row(3, d).unwrap(), 6]);
            want.push(spinkv::ops::NONE);
        }
        let n = want.len();
        let got = dt
            .lookup(&Tensor::from_vec(q, (n, 2), &Device::Cpu).unwrap())
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(got, want, "failure of device write {nth}");
    }
}

/// `expand_decode_plan` on `device` against `PageTables::get`: rows of live sequences at
/// random positions (in and past their pages), padding rows, and words poisoned first.
fn check_decode_plan(device: &Device) {
    for seed in [4u64, 13] {
        let t = random_tables(seed);
        let dt = DeviceTables::upload(&t, device).unwrap();
        let (layers, hkv, p) = (3, 2, 16usize);
        let seqs: Vec<(u64, usize)> = t.sequences().iter().map(|(s, _, n)| (*s, *n)).collect();
        let b = seqs.len() + 3;
        let lay = PlanWords::new(b, layers, hkv, 7);
        let mut w = vec![0xDEAD_BEEFu32; lay.total];
        w[lay.row0..lay.row0 + b].fill(NONE);
        let mut want = Vec::new();
        for (r, &(seq, pages)) in seqs.iter().enumerate() {
            // Positions in the last page, and one page past the end.
            let pos = (pages * p).saturating_sub(1 + (seed as usize * r) % 20) + (r % 2) * p;
            w[lay.queries + 2 * r + 1] = pos as u32;
            w[lay.row0 + r] = dt.row(seq, 0).unwrap();
            want.push((seq, pos, dt.row(seq, 0).unwrap()));
        }
        let words = Tensor::from_vec(w, lay.total, device).unwrap();
        expand_decode_plan(&words, &dt.directory, &dt.leaves, &lay, p).unwrap();
        let got = words.to_device(&Device::Cpu).unwrap().to_vec1::<u32>().unwrap();
        for layer in 0..layers {
            for r in 0..b {
                for h in 0..hkv {
                    let i = (layer * b + r) * hkv + h;
                    let (slot, in_page, trow) = match want.get(r) {
                        Some(&(seq, pos, row0)) => {
                            let page = pos / p;
                            let slot = t.get(seq, layer * hkv + h, page).unwrap_or(NONE);
                            (slot, (pos % p) as u32, row0 + (layer * hkv + h) as u32)
                        }
                        None => (NONE, 0, NONE),
                    };
                    let dst = if slot == NONE { NONE } else { slot * p as u32 + in_page };
                    let at = (layer, r, h, seed, device.location());
                    assert_eq!(got[lay.dst_slots + i], slot, "slot {at:?}");
                    assert_eq!(got[lay.dst_rows + i], in_page, "row {at:?}");
                    assert_eq!(got[lay.dst + i], dst, "dst {at:?}");
                    assert_eq!(got[lay.table_rows + i], trow, "table row {at:?}");
                }
            }
        }
    }
    let lay = PlanWords::new(2, 1, 1, 1);
    let words = Tensor::zeros(lay.total + 1, candle_core::DType::U32, device).unwrap();
    let dt = DeviceTables::upload(&PageTables::new(1, 1), device).unwrap();
    let e = expand_decode_plan(&words, &dt.directory, &dt.leaves, &lay, 16)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("expand_decode_plan") && e.contains(&format!("[{}]", lay.total + 1)),
        "{e}"
    );
}

#[test]
fn decode_plan_matches_the_host_tables_on_cpu() {
    check_decode_plan(&Device::Cpu);
}

#[cfg(feature = "cuda")]
#[test]
fn decode_plan_matches_the_host_tables_on_cuda() {
    check_decode_plan(&Device::new_cuda(0).expect("a CUDA device"));
}
