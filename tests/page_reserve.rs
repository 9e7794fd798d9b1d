//! `SparseKvCache::reserve`: pages held past a sequence's length are used by its later
//! steps instead of new ones; outputs equal a twin cache that allocates on demand (every
//! algorithm; a direct and a tiered fast tier; prompt chunks, decodes that cross pages,
//! padded steps, an aborted step); the pool's accounting holds throughout; a full pool
//! is back-pressure that changes nothing; bad calls are clear errors; removal frees the
//! reserved pages too.

mod common;

use common::harness::*;
use common::*;
use spinkv::partition::{SparseAlgorithm, ALGORITHMS};
use spinkv::{CacheConfig, Error, SeqId, SparseKvCache, SpinCache, StepInput, Tier};

const LAYERS: usize = 2;
const HKV: usize = 2;
const DIRS: usize = LAYERS * HKV;
const P: usize = 8;

fn config(fast_fraction: f64) -> CacheConfig {
    let mut cfg = CacheConfig::new(LAYERS, 4, HKV, 16);
    cfg.page_size = P;
    cfg.max_seq_len = 256;
    cfg.with_token_capacity(3 * 256, fast_fraction)
}

fn algo(name: &str) -> Box<dyn SparseAlgorithm> {
    common::algo::small_algo(name, 64)
}

fn decode_inputs(seqs: &[SeqId]) -> Vec<StepInput> {
    seqs.iter().map(|&seq| StepInput { seq, new_tokens: 1 }).collect()
}

/// One step of `inputs[i]` in cache `i` of both (the same random q/k/v), compared.
fn step_both(caches: &mut [SpinCache], inputs: &[Vec<StepInput>], seed: u64, what: &str) {
    let outs: Vec<_> = caches
        .iter_mut()
        .zip(inputs)
        .map(|(c, inp)| random_step(c, inp, &mut rng(seed)))
        .collect();
    for (layer, (a, b)) in outs[0].iter().zip(&outs[1]).enumerate() {
        let e = max_abs_diff(&a.out, &b.out);
        assert!(
            e <= 1e-5,
            "{what}, step seed {seed}, layer {layer}: reserved and not differ by {e}"
        );
    }
}

#[test]
fn reserved_pages_take_the_tokens_and_change_no_output() {
    for &name in ALGORITHMS {
        for fast in [1.0, 0.3] {
            let what = format!("{name}, fast fraction {fast}");
            let mut caches: Vec<SpinCache> = (0..2)
                .map(|_| SpinCache::new_boxed(config(fast), algo(name)).unwrap())
                .collect();
            let seqs: Vec<Vec<SeqId>> = caches
                .iter_mut()
                .map(|c| (0..3).map(|_| c.add_sequence().unwrap()).collect())
                .collect();
            // Cache 1 holds pages for 100, 61 and 40 tokens of its three sequences.
            for (&s, tokens) in seqs[1].iter().zip([100usize, 61, 40]) {
                caches[1].reserve(s, tokens).unwrap();
                assert_eq!(
                    caches[1].page_slots(s, 0, 0).unwrap().len(),
                    tokens.div_ceil(P),
                    "{what}"
                );
            }
            let held = caches[1].pool_usage();
            caches[1].verify_accounting().unwrap();
            // Prompts in two chunks (the first off a page boundary), then decodes that
            // cross pages, all inside the reservations (the third sequence outgrows its own).
            let per = |lens: [usize; 3]| -> Vec<Vec<StepInput>> {
                seqs.iter()
                    .map(|s| {
                        s.iter()
                            .zip(lens)
                            .map(|(&seq, new_tokens)| StepInput { seq, new_tokens })
                            .collect()
                    })
                    .collect()
            };
            step_both(&mut caches, &per([37, 20, 9]), 1, &what);
            step_both(&mut caches, &per([40, 21, 19]), 2, &what);
            for k in 0..14 {
                let inputs: Vec<Vec<StepInput>> = seqs.iter().map(|s| decode_inputs(s)).collect();
                step_both(&mut caches, &inputs, 10 + k, &what);
            }
            // Sequences at 91, 55 and 42 tokens: only the third went past its pages.
            let u = caches[1].pool_usage();
            assert_eq!(
                u.host_used + u.fast_home_used,
                held.host_used + held.fast_home_used + DIRS,
                "{what}: one new page (the third sequence's 6th), none for the others"
            );
            // An aborted step inside the reservation keeps the pages, restores the length.
            let inputs = decode_inputs(&seqs[1]);
            caches[1].begin_step(&inputs).unwrap();
            caches[1].abort_step().unwrap();
            assert_eq!(caches[1].sequence_len(seqs[1][0]).unwrap(), 91, "{what}");
            assert_eq!(caches[1].pool_usage(), u, "{what}: abort keeps the reserved pages");
            // Padded steps (the device-only decoders) over reserved pages.
            let inputs: Vec<Vec<StepInput>> = seqs.iter().map(|s| decode_inputs(s)).collect();
            if let Some(shape) = caches[0].padded_shape(&inputs[0]) {
                for k in 0..3u64 {
                    let outs: Vec<_> = caches
                        .iter_mut()
                        .zip(&inputs)
                        .map(|(c, inp)| padded_step(c, inp, shape, &mut rng(50 + k), &mut rng(60 + k)))
                        .collect();
                    for (layer, (a, b)) in outs[0].iter().zip(&outs[1]).enumerate() {
                        let e = max_abs_diff(&a.out.narrow(0, 0, 3).unwrap(), &b.out.narrow(0, 0, 3).unwrap());
                        assert!(e <= 1e-5, "{what}: padded step {k}, layer {layer}: differ by {e}");
                    }
                }
            }
            caches[1].verify_accounting().unwrap();
            remove_all_and_check(&mut caches, seqs);
        }
    }
}

#[test]
fn reserve_is_all_or_nothing_and_names_bad_calls() {
    // 612 tokens: 77 pages a directory, 64 of them for two sequences of 256.
    let cfg = config(1.0).with_token_capacity(612, 1.0);
    let mut c = SpinCache::new_boxed(cfg, algo("dense")).unwrap();
    let pages = c.pool_usage().host_capacity / DIRS;
    let a = c.add_sequence().unwrap();
    let b = c.add_sequence().unwrap();
    c.reserve(a, 256).unwrap();
    c.reserve(b, 256).unwrap();
    let before = c.pool_usage();
    let free_pages = pages - 2 * 256 / P;
    // A third sequence wants more than is left: back-pressure, nothing taken.
    let s = c.add_sequence().unwrap();
    match c.reserve(s, 256) {
        Err(Error::PoolExhausted {
            tier: Tier::Host,
            needed,
            free,
        }) => assert_eq!((needed, free), (256 / P * DIRS, free_pages * DIRS)),
        other => panic!("expected back-pressure, got {other:?}"),
    }
    assert_eq!(c.pool_usage(), before);
    assert_eq!(c.page_slots(s, 0, 0).unwrap().len(), 0);
    // Less than it holds: nothing to do.
    c.reserve(a, 17).unwrap();
    assert_eq!(c.pool_usage(), before);
    let e = c.reserve(a, 257).unwrap_err().to_string();
    assert!(
        e.contains("SparseKvCache::reserve") && e.contains("max_seq_len 256"),
        "{e}"
    );
    c.begin_step(&[StepInput { seq: a, new_tokens: 3 }]).unwrap();
    assert!(matches!(c.reserve(s, 8), Err(Error::StepMisuse { .. })));
    c.abort_step().unwrap();
    c.remove_sequence(b).unwrap();
    assert!(matches!(c.reserve(b, 8), Err(Error::UnknownSequence(_))));
    // b's pages are back: s gets its reservation now, and fills it.
    c.reserve(s, 256).unwrap();
    random_step(
        &mut c,
        &[StepInput {
            seq: s,
            new_tokens: 256,
        }],
        &mut rng(9),
    );
    c.verify_accounting().unwrap();
    remove_all_and_check(&mut [c], vec![vec![a, s]]);
}
