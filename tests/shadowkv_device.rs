//! ShadowKV's device mode (a fast tier holding every page) on the CPU:
//! - its ordinary steps equal host mode's (a smaller fast tier: selection and rebuild on
//!   the host) within 1e-5 (f32), with the same counters, through prefills, joins and
//!   leaves;
//! - padded steps (the form CUDA graphs capture) equal ordinary steps within 1e-6, padding
//!   rows finite; a sequence before its first decode step has no padded shape (it is
//!   compressed in an ordinary step), and `begin_padded_decode` says so;
//! - removing sequences gives back their left-factor pages: many more sequences than the
//!   tables hold at once come and go without running out.

mod common;

use common::harness::{add_to_each as add, decode_each_and_compare, padded_step, random_step, remove_all_and_check};
use common::{max_abs_diff, rng};
use spinkv::partition::{ShadowKv, ShadowKvConfig};
use spinkv::{CacheConfig, SeqId, SparseKvCache, SpinCache, StepInput};

/// 2 layers, 4 query heads over 2 KV heads, head_dim 16, chunks (pages) of 8 tokens;
/// `fraction` of the pages fit in the fast tier (1.0: device mode).
fn cfg(fraction: f64) -> CacheConfig {
    cfg_layers(2, fraction)
}

/// [`cfg`] with `layers` layers.
fn cfg_layers(layers: usize, fraction: f64) -> CacheConfig {
    CacheConfig::new(layers, 4, 2, 16)
        .with_page_size(8)
        .with_token_capacity(2048, fraction)
}

/// Rank 20 of Hkv·D = 32 (the rebuilt keys are approximate), 4 rebuilt chunks, 2 outliers
/// and a window of 16 tokens.
fn shadow() -> ShadowKv {
    ShadowKv::new(ShadowKvConfig {
        chunk_tokens: 8,
        rank: 20,
        sparse_budget_tokens: 32,
        outlier_chunks: 2,
        window_tokens: 16,
    })
    .unwrap()
}

fn decode(seqs: &[SeqId]) -> Vec<StepInput> {
    seqs.iter().map(|&seq| StepInput { seq, new_tokens: 1 }).collect()
}

#[test]
fn device_mode_equals_host_mode() {
    let mut caches = [
        SpinCache::new(cfg(1.0), shadow()).unwrap(),
        SpinCache::new(cfg(0.5), shadow()).unwrap(),
    ];
    let mut seqs = [Vec::new(), Vec::new()];
    for len in [150usize, 61, 203] {
        add(&mut caches, &mut seqs, len);
    }
    for step in 0..12u64 {
        if step == 5 {
            for (c, s) in caches.iter_mut().zip(seqs.iter_mut()) {
                c.remove_sequence(s.remove(0)).unwrap();
            }
            add(&mut caches, &mut seqs, 97);
        }
        decode_each_and_compare(
            &mut caches,
            &seqs,
            50 + step,
            1e-5,
            &format!("step {step}: device vs host mode"),
        );
    }
    let (a, b) = (caches[0].stats(), caches[1].stats());
    assert!(a.rebuilt_pages > 0, "{a:?}");
    assert_eq!(
        (a.decode_rows, a.pages_attended, a.pages_available, a.rebuilt_pages),
        (b.decode_rows, b.pages_attended, b.pages_available, b.rebuilt_pages),
        "counters"
    );
    remove_all_and_check(&mut caches, seqs.to_vec());
}

#[test]
fn padded_steps_equal_ordinary_steps() {
    let mut caches = [
        SpinCache::new(cfg(1.0), shadow()).unwrap(),
        SpinCache::new(cfg(1.0), shadow()).unwrap(),
    ];
    let mut seqs = [Vec::new(), Vec::new()];
    for len in [150usize, 9, 203] {
        add(&mut caches, &mut seqs, len);
    }
    let mut pad = rng(999);
    let (mut padded_steps, mut ordinary_steps) = (0, 0);
    for step in 0..14u64 {
        if step == 6 {
            for (c, s) in caches.iter_mut().zip(seqs.iter_mut()) {
                c.remove_sequence(s.remove(1)).unwrap();
            }
            for len in [40usize, 130] {
                add(&mut caches, &mut seqs, len);
            }
        }
        let (ia, ib) = (decode(&seqs[0]), decode(&seqs[1]));
        let eager = random_step(&mut caches[0], &ia, &mut rng(100 + step));
        let Some(shape) = caches[1].padded_shape(&ib) else {
            // Not compressed yet (the first decode step, and the one after the joins).
            assert!(step == 0 || step == 6, "step {step}: no padded shape");
            let e = caches[1].begin_padded_decode(&ib, spinkv::PaddedShape { batch: 4, pages: 64 });
            let msg = e.unwrap_err().to_string();
            assert!(msg.contains("ordinary step first"), "{msg}");
            let b = random_step(&mut caches[1], &ib, &mut rng(100 + step));
            for (x, y) in eager.iter().zip(&b) {
                assert!(max_abs_diff(&x.out, &y.out) <= 1e-6);
            }
            ordinary_steps += 1;
            continue;
        };
        padded_steps += 1;
        let padded = padded_step(&mut caches[1], &ib, shape, &mut rng(100 + step), &mut pad);
        for (layer, (e, p)) in eager.iter().zip(&padded).enumerate() {
            let n = ia.len();
            let err = max_abs_diff(&e.out, &p.out.narrow(0, 0, n).unwrap());
            assert!(err <= 1e-6, "step {step} layer {layer}: padded differs by {err}");
            let rest = p.out.narrow(0, n, shape.batch - n).unwrap();
            let vals = rest.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(vals.iter().all(|x| x.is_finite()), "padding rows not finite");
        }
    }
    assert_eq!((padded_steps, ordinary_steps), (12, 2));
    let (a, b) = (caches[0].stats(), caches[1].stats());
    assert!(a.rebuilt_pages > 0, "{a:?}");
    assert_eq!(
        (
            a.steps,
            a.decode_rows,
            a.pages_attended,
            a.pages_available,
            a.rebuilt_pages
        ),
        (
            b.steps,
            b.decode_rows,
            b.pages_attended,
            b.pages_available,
            b.rebuilt_pages
        ),
        "counters"
    );
    for c in &caches {
        c.verify_accounting().unwrap();
    }
}

#[test]
fn removed_sequences_give_their_left_pages_back() {
    // 2048 tokens of capacity: 256 pages per directory... the left-factor pool holds the
    // compressed chunks of about 2048 tokens per layer. 40 sequences of 300 tokens (12000)
    // come and go, 3 at a time, each compressed at its first decode step.
    let mut c = SpinCache::new(cfg(1.0), shadow()).unwrap();
    let mut r = rng(5);
    let mut live: Vec<SeqId> = Vec::new();
    for i in 0..40 {
        if live.len() == 3 {
            c.remove_sequence(live.remove(0)).unwrap();
        }
        let seq = c.add_sequence().unwrap();
        random_step(&mut c, &[StepInput { seq, new_tokens: 300 }], &mut r);
        live.push(seq);
        let out = random_step(&mut c, &decode(&live), &mut r);
        assert_eq!(out.len(), 2, "sequence {i}");
    }
    assert!(c.stats().rebuilt_pages > 0);
    for s in live {
        c.remove_sequence(s).unwrap();
    }
    c.verify_accounting().unwrap();
    assert_eq!(c.pool_usage().host_used, 0);
}

/// Sequences compressed in one step are factorized as a batch, same-length prompts stacked
/// together: each must come out as if it had been compressed alone (within 1e-5, f32), in
/// both modes. Three of the four prompts have one length and different contents.
#[test]
fn a_compressed_batch_equals_each_sequence_alone() {
    use common::randn;
    use spinkv::StepInput;
    let lens = [150usize, 97, 150, 150];
    for fraction in [1.0, 0.5] {
        let mut together = SpinCache::new(cfg(fraction), shadow()).unwrap();
        let mut alone: Vec<SpinCache> = lens
            .iter()
            .map(|_| SpinCache::new(cfg(fraction), shadow()).unwrap())
            .collect();
        let mut ids = Vec::new();
        let mut alone_ids = Vec::new();
        for (i, &len) in lens.iter().enumerate() {
            let seq = together.add_sequence().unwrap();
            random_step(
                &mut together,
                &[StepInput { seq, new_tokens: len }],
                &mut rng(70 + i as u64),
            );
            ids.push(seq);
            let seq = alone[i].add_sequence().unwrap();
            random_step(
                &mut alone[i],
                &[StepInput { seq, new_tokens: len }],
                &mut rng(70 + i as u64),
            );
            alone_ids.push(seq);
        }
        // Two decode steps: the first compresses all four (one batch), the second attends
        // the compressed states.
        for step in 0..2u64 {
            let c = together.config().clone();
            let mut r = rng(80 + step);
            together.begin_step(&decode(&ids)).unwrap();
            for (a, &seq) in alone.iter_mut().zip(&alone_ids) {
                a.begin_step(&[StepInput { seq, new_tokens: 1 }]).unwrap();
            }
            for layer in 0..c.num_layers {
                let b = ids.len();
                let q = randn(&mut r, &[b, c.num_q_heads, c.head_dim], 1.0);
                let k = randn(&mut r, &[b, c.num_kv_heads, c.head_dim], 1.0);
                let v = randn(&mut r, &[b, c.num_kv_heads, c.head_dim], 1.0);
                let out = together.attend(layer, &q, &k, &v).unwrap();
                for (i, a) in alone.iter_mut().enumerate() {
                    let row = |x: &candle_core::Tensor| x.narrow(0, i, 1).unwrap();
                    let one = a.attend(layer, &row(&q), &row(&k), &row(&v)).unwrap();
                    let e = max_abs_diff(&row(&out), &one);
                    assert!(
                        e <= 1e-5,
                        "fraction {fraction} step {step} layer {layer} sequence {i}: batch vs alone differ by {e}"
                    );
                }
            }
            together.end_step().unwrap();
            for a in &mut alone {
                a.end_step().unwrap();
            }
        }
        assert!(together.stats().rebuilt_pages > 0, "{:?}", together.stats());
    }
}

/// With [`ShadowKv::compress_ahead`] (the default on CUDA) a sequence's first decode step
/// factorizes all of its layers at layer 0 and the later layers take their state when they
/// come; without it each layer factorizes its own. The outputs must match within 1e-5
/// (f32) in both modes, through joins, a removal, and a step aborted after layer 0 (the
/// later layers' states then wait, computed, for the retried step), with 4 layers. It
/// runs in a rayon pool of 16 threads: compressing ahead applies while a step compresses
/// fewer sequences than the pool has threads.
#[test]
fn compressing_ahead_equals_layer_by_layer() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(16)
        .build()
        .unwrap()
        .install(ahead_equals_layer_by_layer);
}

fn ahead_equals_layer_by_layer() {
    for fraction in [1.0, 0.5] {
        let mut caches = [
            SpinCache::new(cfg_layers(4, fraction), shadow().compress_ahead(true)).unwrap(),
            SpinCache::new(cfg_layers(4, fraction), shadow().compress_ahead(false)).unwrap(),
        ];
        let mut seqs = [Vec::new(), Vec::new()];
        for len in [150usize, 61, 203] {
            add(&mut caches, &mut seqs, len);
        }
        for step in 0..8u64 {
            if step == 3 {
                for (c, s) in caches.iter_mut().zip(seqs.iter_mut()) {
                    c.remove_sequence(s.remove(0)).unwrap();
                }
                for len in [97usize, 120] {
                    add(&mut caches, &mut seqs, len);
                }
                // The joined sequences' first decode step starts, runs layer 0 (which
                // compresses layers 1-3 ahead in caches[0]) and is aborted.
                let c = &mut caches[0];
                let cfg = c.config().clone();
                let b = seqs[0].len();
                let mut r = rng(7);
                c.begin_step(&decode(&seqs[0])).unwrap();
                let q = common::randn(&mut r, &[b, cfg.num_q_heads, cfg.head_dim], 1.0);
                let kv = common::randn(&mut r, &[b, cfg.num_kv_heads, cfg.head_dim], 1.0);
                c.attend(0, &q, &kv, &kv).unwrap();
                c.abort_step().unwrap();
                c.verify_accounting().unwrap();
            }
            let what = format!("fraction {fraction} step {step}: ahead vs layer by layer");
            decode_each_and_compare(&mut caches, &seqs, 300 + step, 1e-5, &what);
        }
        let (a, b) = (caches[0].stats(), caches[1].stats());
        assert!(a.rebuilt_pages > 0, "{a:?}");
        assert_eq!(
            (a.decode_rows, a.pages_attended, a.rebuilt_pages),
            (b.decode_rows, b.pages_attended, b.rebuilt_pages),
            "counters"
        );
        remove_all_and_check(&mut caches, seqs.to_vec());
    }
}
