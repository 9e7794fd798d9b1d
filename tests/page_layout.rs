//! `PageLayout::ByDirectory` against the default `Interleaved`: the same outputs (every
//! algorithm, a direct and a tiered fast tier, ordinary, mixed and padded steps), one (layer,
//! KV head)'s pages of a prompt in adjacent slots, capacity rounded to whole page groups,
//! back-pressure at exactly that capacity, and every page freed by removal.

mod common;

use common::harness::*;
use common::*;
use spinkv::partition::{SparseAlgorithm, ALGORITHMS};
use spinkv::{CacheConfig, Error, PageLayout, SeqId, SparseKvCache, SpinCache, StepInput, Tier};

const LAYERS: usize = 3;
const HKV: usize = 2;
const DIRS: usize = LAYERS * HKV;

fn config(layout: PageLayout, fast_fraction: f64) -> CacheConfig {
    let mut cfg = CacheConfig::new(LAYERS, 4, HKV, 16);
    cfg.page_size = 8;
    cfg.max_seq_len = 512;
    let mut cfg = cfg.with_token_capacity(3 * 256, fast_fraction);
    cfg.page_layout = layout;
    cfg
}

fn algo(name: &str) -> Box<dyn SparseAlgorithm> {
    common::algo::small_algo(name, 64)
}

fn decode_inputs(seqs: &[SeqId]) -> Vec<StepInput> {
    seqs.iter().map(|&seq| StepInput { seq, new_tokens: 1 }).collect()
}

#[test]
fn by_directory_gives_the_same_outputs_with_adjacent_pages() {
    for &name in ALGORITHMS {
        for fast in [1.0, 0.3] {
            let what = format!("{name}, fast fraction {fast}");
            let mut caches: Vec<SpinCache> = [PageLayout::Interleaved, PageLayout::ByDirectory]
                .into_iter()
                .map(|l| SpinCache::new_boxed(config(l, fast), algo(name)).unwrap())
                .collect();
            let mut seqs = vec![Vec::new(), Vec::new()];
            for len in [37, 101, 64] {
                add_to_each(&mut caches, &mut seqs, len);
            }
            // One prompt's pages: 101 tokens = 13 pages of 8, allocated in one step.
            for layer in 0..LAYERS {
                for h in 0..HKV {
                    let inter = caches[0].page_slots(seqs[0][1], layer, h).unwrap();
                    let by_dir = caches[1].page_slots(seqs[1][1], layer, h).unwrap();
                    assert_eq!((inter.len(), by_dir.len()), (13, 13), "{what}");
                    for w in inter.windows(2) {
                        assert_eq!(
                            w[1],
                            w[0] + DIRS as u32,
                            "{what}: interleaved pages are {DIRS} slots apart"
                        );
                    }
                    for w in by_dir.windows(2) {
                        assert_eq!(w[1], w[0] + 1, "{what}: pages by directory are adjacent");
                    }
                }
            }
            // Mixed steps: a prompt chunk next to the decodes, then decodes that cross pages.
            for (i, chunk) in [(0usize, 9usize), (2, 1), (1, 30)] {
                let mut outs = Vec::new();
                for (c, s) in caches.iter_mut().zip(&seqs) {
                    let mut inputs = decode_inputs(s);
                    inputs[i].new_tokens = chunk;
                    outs.push(random_step(c, &inputs, &mut rng(7 + i as u64)));
                }
                for (layer, (a, b)) in outs[0].iter().zip(&outs[1]).enumerate() {
                    let e = max_abs_diff(&a.out, &b.out);
                    assert!(e <= 1e-5, "{what}: mixed step, layer {layer}: layouts differ by {e}");
                }
            }
            for step in 0..12 {
                decode_each_and_compare(&mut caches, &seqs, 100 + step, 1e-5, &what);
            }
            // Padded steps, where the cache runs them (the device-only decoders).
            let inputs: Vec<Vec<StepInput>> = seqs.iter().map(|s| decode_inputs(s)).collect();
            let padded = caches[0].padded_shape(&inputs[0]);
            assert!(padded.is_some() || name != "dense", "{what}: Dense runs padded steps");
            if let Some(shape) = padded {
                for step in 0..3u64 {
                    let mut outs = Vec::new();
                    for (c, inp) in caches.iter_mut().zip(&inputs) {
                        let shape_here = c.padded_shape(inp).expect("both caches pad");
                        assert_eq!(shape_here, shape);
                        outs.push(padded_step(c, inp, shape, &mut rng(200 + step), &mut rng(300 + step)));
                    }
                    for (layer, (a, b)) in outs[0].iter().zip(&outs[1]).enumerate() {
                        let e = max_abs_diff(&a.out.narrow(0, 0, 3).unwrap(), &b.out.narrow(0, 0, 3).unwrap());
                        assert!(
                            e <= 1e-5,
                            "{what}: padded step {step}, layer {layer}: layouts differ by {e}"
                        );
                    }
                }
            }
            for c in &caches {
                c.verify_accounting().unwrap();
            }
            remove_all_and_check(&mut caches, seqs);
        }
    }
}

#[test]
fn by_directory_capacity_is_whole_groups_and_full_is_back_pressure() {
    // 100 host pages and 61 fast homes over 6 directories: 16 and 10 groups.
    let mut cfg = CacheConfig::new(LAYERS, 4, HKV, 16);
    cfg.page_size = 8;
    cfg.max_seq_len = 512;
    cfg.host_pages = 100;
    cfg.fast_home_pages = 61;
    cfg.fast_pages = 16;
    cfg.page_layout = PageLayout::ByDirectory;
    let mut cache = SpinCache::new_boxed(cfg, algo("dense")).unwrap();
    let u = cache.pool_usage();
    assert_eq!((u.host_capacity, u.fast_home_capacity), (16 * DIRS, 10 * DIRS));
    // 26 groups = 26 logical pages = 208 tokens: two prompts of 104 fill the cache.
    let a = cache.add_sequence().unwrap();
    let b = cache.add_sequence().unwrap();
    random_step(
        &mut cache,
        &[StepInput {
            seq: a,
            new_tokens: 100,
        }],
        &mut rng(1),
    );
    let u = cache.pool_usage();
    assert_eq!(
        (u.fast_home_used, u.host_used),
        (10 * DIRS, 3 * DIRS),
        "fast homes first"
    );
    random_step(
        &mut cache,
        &[StepInput {
            seq: b,
            new_tokens: 104,
        }],
        &mut rng(2),
    );
    // a is at 100 tokens: 4 more fit its last page, the 5th needs a page.
    random_step(&mut cache, &[StepInput { seq: a, new_tokens: 4 }], &mut rng(3));
    let before = cache.pool_usage();
    assert_eq!(before.host_used + before.fast_home_used, 26 * DIRS);
    match cache.begin_step(&[StepInput { seq: a, new_tokens: 1 }]) {
        Err(Error::PoolExhausted {
            tier: Tier::Host,
            needed,
            free,
        }) => assert_eq!((needed, free), (DIRS, 0)),
        other => panic!("a full pool must be back-pressure, got {other:?}"),
    }
    assert_eq!(cache.pool_usage(), before, "back-pressure changes nothing");
    assert_eq!(cache.sequence_len(a).unwrap(), 104);
    cache.verify_accounting().unwrap();
    // Removing b frees its groups for a.
    cache.remove_sequence(b).unwrap();
    random_step(&mut cache, &[StepInput { seq: a, new_tokens: 50 }], &mut rng(4));
    cache.verify_accounting().unwrap();
    remove_all_and_check(&mut [cache], vec![vec![a]]);
}

#[test]
fn page_slots_names_bad_arguments() {
    let mut cache = SpinCache::new_boxed(config(PageLayout::ByDirectory, 1.0), algo("dense")).unwrap();
    let s = cache.add_sequence().unwrap();
    let err = cache.page_slots(s, LAYERS, 0).unwrap_err().to_string();
    assert!(
        err.contains("SpinCache::page_slots") && err.contains("layer 3"),
        "{err}"
    );
    cache.remove_sequence(s).unwrap();
    assert!(matches!(cache.page_slots(s, 0, 0), Err(Error::UnknownSequence(_))));
    // By directory, a host tier of fewer pages than directories holds no page group.
    let mut tiny = config(PageLayout::ByDirectory, 1.0);
    tiny.host_pages = DIRS - 1;
    let err = SpinCache::new_boxed(tiny, algo("dense")).unwrap_err().to_string();
    assert!(err.contains("host_pages (5)") && err.contains("ByDirectory"), "{err}");
}
