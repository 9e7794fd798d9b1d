//! The failure contract (docs/ARCHITECTURE.md, "Failure contract"):
//!
//! * an `attend` that fails past its input validation poisons the step: `attend` and
//!   `end_step` then return `StepMisuse` until `abort_step`, and aborting then running
//!   the step again gives exactly the outputs of a run where nothing failed — for all
//!   five algorithms, with an algorithm whose `select` fails once (`FailingSelect`);
//! * Quest's page bounds roll back on abort (the aborted attempt carried other keys);
//! * huge `new_tokens` and `SeqId`s of another cache are errors;
//! * with the `fault-injection` feature: `begin_step`, `remove_sequence`, `abort_step`
//!   and `end_step` fail on the N-th device call for every N they make, leave
//!   `sequence_len`, `pool_usage` and `verify_accounting` as they were, and the retry
//!   succeeds; `SpinCache::new` whose N-th allocation stage fails returns `Error::Alloc`
//!   naming the part and its size, for every stage; a random walk over the public API with injected failures (10k operations
//!   over several seeds) keeps the accounting and never panics; `DeviceLru::set_budgets`
//!   skips budgets equal to the last ones it set, and retries after a failed upload.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use spinkv::partition::{
    BoundsFormat, Dense, InfLlm, InfLlmConfig, Quest, QuestConfig, ShadowKv, ShadowKvConfig, SparseAlgorithm,
    Streaming, StreamingConfig,
};
use spinkv::{CacheConfig, Error, SparseKvCache, SpinCache, StepInput};

const LAYERS: usize = 2;
const HQ: usize = 4;
const HKV: usize = 2;
const D: usize = 16;

fn config() -> CacheConfig {
    CacheConfig::new(LAYERS, HQ, HKV, D)
        .with_page_size(8)
        .with_token_capacity(512, 0.25)
}

type Make = Box<dyn Fn() -> Box<dyn SparseAlgorithm>>;

fn quest(bounds: BoundsFormat) -> Box<dyn SparseAlgorithm> {
    Box::new(Quest::new(QuestConfig {
        budget_tokens: 32,
        sink_tokens: 8,
        window_tokens: 8,
        dense_layers: 0,
        shared_across_heads: false,
        bounds,
        ..Default::default()
    }))
}

/// The five algorithms (and Quest with int8 bounds) with budgets small enough that the
/// sparse ones really select.
fn algorithms() -> Vec<(&'static str, Make)> {
    vec![
        (
            "dense",
            Box::new(|| Box::new(Dense::new()) as Box<dyn SparseAlgorithm>) as Make,
        ),
        (
            "streaming",
            Box::new(|| {
                Box::new(Streaming::new(StreamingConfig {
                    sink_tokens: 8,
                    window_tokens: 16,
                })) as Box<dyn SparseAlgorithm>
            }),
        ),
        ("quest", Box::new(|| quest(BoundsFormat::KvDtype))),
        ("quest-q8", Box::new(|| quest(BoundsFormat::Int8))),
        (
            "infllm",
            Box::new(|| {
                Box::new(
                    InfLlm::new(InfLlmConfig {
                        block_tokens: 16,
                        sink_tokens: 8,
                        window_tokens: 16,
                        topk_blocks: 2,
                        repr_topk: 4,
                    })
                    .unwrap(),
                ) as Box<dyn SparseAlgorithm>
            }),
        ),
        (
            "shadowkv",
            Box::new(|| {
                Box::new(
                    ShadowKv::new(ShadowKvConfig {
                        chunk_tokens: 8,
                        rank: 8,
                        sparse_budget_tokens: 16,
                        outlier_chunks: 1,
                        window_tokens: 8,
                    })
                    .unwrap(),
                ) as Box<dyn SparseAlgorithm>
            }),
        ),
    ]
}

/// Two sequences: prefills (the first in two chunks), then batched decode steps and one
/// mixed step (a decode next to a prefill chunk).
fn schedule() -> Vec<Vec<(usize, usize)>> {
    let mut s = vec![vec![(0, 37)], vec![(0, 20), (1, 45)]];
    for i in 0..6 {
        if i == 3 {
            s.push(vec![(0, 1), (1, 9)]);
        } else {
            s.push(vec![(0, 1), (1, 1)]);
        }
    }
    s
}

/// Per step and layer, `[q, k, v]` for the step's tokens.
fn inputs(seed: u64) -> Vec<Vec<[Tensor; 3]>> {
    let mut r = rng(seed);
    schedule()
        .iter()
        .map(|st| {
            let t: usize = st.iter().map(|x| x.1).sum();
            (0..LAYERS)
                .map(|_| {
                    [
                        randn(&mut r, &[t, HQ, D], 1.0),
                        randn(&mut r, &[t, HKV, D], 1.0),
                        randn(&mut r, &[t, HKV, D], 1.0),
                    ]
                })
                .collect()
        })
        .collect()
}

/// Runs the schedule; on an `attend` error checks that the step is poisoned, aborts it
/// and runs it again. Returns every layer's output of every step, and the failures seen.
fn run(algo: Box<dyn SparseAlgorithm>, data: &[Vec<[Tensor; 3]>]) -> (Vec<Tensor>, usize) {
    let mut cache = SpinCache::new_boxed(config(), algo).unwrap();
    let seqs = [cache.add_sequence().unwrap(), cache.add_sequence().unwrap()];
    let mut outs = Vec::new();
    let mut failures = 0;
    for (st, layers) in schedule().iter().zip(data) {
        let step: Vec<StepInput> = st
            .iter()
            .map(|&(s, n)| StepInput {
                seq: seqs[s],
                new_tokens: n,
            })
            .collect();
        let lens: Vec<usize> = seqs.iter().map(|&s| cache.sequence_len(s).unwrap()).collect();
        let usage = cache.pool_usage();
        'attempt: loop {
            cache.begin_step(&step).unwrap();
            let mut got = Vec::new();
            for (layer, [q, k, v]) in layers.iter().enumerate() {
                match cache.attend(layer, q, k, v) {
                    Ok(o) => got.push(o),
                    Err(e) => {
                        failures += 1;
                        assert!(!matches!(e, Error::StepMisuse { .. }), "{e}");
                        // Poisoned: the next layer, the same layer and end_step refuse.
                        for l in [layer, (layer + 1) % LAYERS] {
                            let [q, k, v] = &layers[l];
                            let r = cache.attend(l, q, k, v);
                            assert!(
                                matches!(&r, Err(Error::StepMisuse { msg, .. }) if msg.contains("abort_step")),
                                "attend after a failure: {r:?}"
                            );
                        }
                        assert!(matches!(cache.end_step(), Err(Error::StepMisuse { .. })));
                        cache.abort_step().unwrap();
                        cache.verify_accounting().unwrap();
                        let now: Vec<usize> = seqs.iter().map(|&s| cache.sequence_len(s).unwrap()).collect();
                        assert_eq!(now, lens, "lengths after abort");
                        assert_eq!(cache.pool_usage().host_used, usage.host_used, "host pages after abort");
                        continue 'attempt;
                    }
                }
            }
            cache.end_step().unwrap();
            outs.extend(got);
            break;
        }
        cache.verify_accounting().unwrap();
    }
    (outs, failures)
}

fn assert_same(name: &str, a: &[Tensor], b: &[Tensor]) {
    assert_eq!(a.len(), b.len(), "{name}: output count");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let diff = max_abs_diff(x, y);
        assert!(
            diff == 0.0,
            "{name}: output {i} differs by {diff} from the run without failures"
        );
    }
}

#[test]
fn a_failed_attend_poisons_the_step_and_abort_plus_rerun_equals_no_failure() {
    let data = inputs(3);
    for (name, make) in algorithms() {
        let (clean, none) = run(make(), &data);
        assert_eq!(none, 0);
        // select is called once per layer of every step with a decoding sequence: fail
        // the second layer of one decode step and the first layer of another.
        let (failed, n) = run(Box::new(FailingSelect::new(make(), &[2, 7])), &data);
        assert_eq!(n, 2, "{name}: both injected failures must be seen");
        assert_same(name, &clean, &failed);
    }
}

#[test]
fn input_validation_errors_do_not_poison_the_step() {
    let mut cache = SpinCache::new(config(), Dense::new()).unwrap();
    let s = cache.add_sequence().unwrap();
    cache.begin_step(&[StepInput { seq: s, new_tokens: 3 }]).unwrap();
    let bad = Tensor::zeros((3, HQ, D + 2), DType::F32, &Device::Cpu).unwrap();
    let kv = Tensor::zeros((3, HKV, D), DType::F32, &Device::Cpu).unwrap();
    let q = Tensor::zeros((3, HQ, D), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(cache.attend(0, &bad, &kv, &kv), Err(Error::Invalid { .. })));
    for l in 0..LAYERS {
        cache.attend(l, &q, &kv, &kv).unwrap();
    }
    cache.end_step().unwrap();
}

/// Item 10: an aborted step that wrote other keys into a page the sequence already held
/// leaves Quest's bounds of that page as they were, so selections after the rerun equal
/// those of a run that never aborted (Quest with no dense layers, bounds in the KV dtype
/// and as int8 rows).
#[test]
fn quest_bounds_roll_back_on_abort() {
    for bounds in [BoundsFormat::KvDtype, BoundsFormat::Int8] {
        quest_bounds_roll_back(bounds);
    }
}

fn quest_bounds_roll_back(bounds: BoundsFormat) {
    // Large keys in the aborted attempt: they would widen the bounds of page 12
    // (tokens 96..103) for good if the abort left them there.
    let steps = [100usize, 1, 1, 1, 1, 1, 1, 1];
    let run = |abort: bool| abort_and_rerun(quest(bounds), 9, &steps, 2, (1.0, 50.0), abort);
    assert_same(&format!("quest, {bounds:?} bounds"), &run(false), &run(true));
}

/// One sequence through `steps` (new tokens per step) with `algo`, random inputs from
/// `seed`: the outputs of every step and layer. With `abort`, step `at` is first run
/// with other inputs (queries and keys scaled by `scale`) and aborted, then run again.
/// Both runs draw the same numbers, so without a trace of the abort they are equal.
fn abort_and_rerun(
    algo: Box<dyn SparseAlgorithm>,
    seed: u64,
    steps: &[usize],
    at: usize,
    (q_scale, k_scale): (f32, f32),
    abort: bool,
) -> Vec<Tensor> {
    let mut cache = SpinCache::new_boxed(config(), algo).unwrap();
    let seq = cache.add_sequence().unwrap();
    let mut r = rng(seed);
    let mut outs = Vec::new();
    for (i, &n) in steps.iter().enumerate() {
        let mut draw = |qs: f32, ks: f32| -> Vec<[Tensor; 3]> {
            (0..LAYERS)
                .map(|_| {
                    [
                        randn(&mut r, &[n, HQ, D], qs),
                        randn(&mut r, &[n, HKV, D], ks),
                        randn(&mut r, &[n, HKV, D], 1.0),
                    ]
                })
                .collect()
        };
        let aborted = draw(q_scale, k_scale);
        let layers = draw(1.0, 1.0);
        if abort && i == at {
            cache.begin_step(&[StepInput { seq, new_tokens: n }]).unwrap();
            for (l, [q, k, v]) in aborted.iter().enumerate() {
                cache.attend(l, q, k, v).unwrap();
            }
            cache.abort_step().unwrap();
        }
        cache.begin_step(&[StepInput { seq, new_tokens: n }]).unwrap();
        for (l, [q, k, v]) in layers.iter().enumerate() {
            outs.push(cache.attend(l, q, k, v).unwrap());
        }
        cache.end_step().unwrap();
    }
    outs
}

/// An aborted InfLLM step with a run longer than one round (300 tokens: it overwrites
/// the whole ring, which its undo plane cannot restore) is rolled back from the ring's
/// copy: the rerun and the decode steps after it give the outputs of a run that never
/// aborted (before, the sequence was marked unrecoverable and its next step failed).
#[test]
fn infllm_long_run_rolls_back_on_abort() {
    let make = || -> Box<dyn SparseAlgorithm> {
        Box::new(
            InfLlm::new(InfLlmConfig {
                block_tokens: 16,
                sink_tokens: 8,
                window_tokens: 16,
                topk_blocks: 2,
                repr_topk: 4,
            })
            .unwrap(),
        )
    };
    let steps = [100usize, 300, 1, 1, 1, 1, 1];
    let run = |abort: bool| abort_and_rerun(make(), 11, &steps, 1, (3.0, 3.0), abort);
    assert_same("infllm, a 300-token run aborted", &run(false), &run(true));
}

#[test]
fn huge_new_tokens_is_an_error() {
    let mut cache = SpinCache::new(config(), Dense::new()).unwrap();
    let s = cache.add_sequence().unwrap();
    cache.begin_step(&[StepInput { seq: s, new_tokens: 5 }]).unwrap();
    let q = Tensor::zeros((5, HQ, D), DType::F32, &Device::Cpu).unwrap();
    let kv = Tensor::zeros((5, HKV, D), DType::F32, &Device::Cpu).unwrap();
    for l in 0..LAYERS {
        cache.attend(l, &q, &kv, &kv).unwrap();
    }
    cache.end_step().unwrap();
    for n in [usize::MAX, usize::MAX - 4, usize::MAX / 2] {
        let e = cache
            .begin_step(&[StepInput { seq: s, new_tokens: n }])
            .unwrap_err()
            .to_string();
        assert!(e.contains("begin_step") && e.contains("max_seq_len"), "{e}");
    }
    assert_eq!(cache.sequence_len(s).unwrap(), 5);
    cache.verify_accounting().unwrap();
}

#[test]
fn a_seq_id_from_another_cache_is_an_error() {
    let mut a = SpinCache::new(config(), Dense::new()).unwrap();
    let mut b = SpinCache::new(config(), Dense::new()).unwrap();
    let sa = a.add_sequence().unwrap();
    let sb = b.add_sequence().unwrap();
    assert_eq!(sa.id(), sb.id(), "both caches number their sequences from 0");
    assert_ne!(sa, sb);
    let e = b.sequence_len(sa).unwrap_err().to_string();
    assert!(e.contains("another cache"), "{e}");
    let e = b
        .begin_step(&[StepInput { seq: sa, new_tokens: 1 }])
        .unwrap_err()
        .to_string();
    assert!(e.contains("begin_step") && e.contains("another cache"), "{e}");
    let e = b.remove_sequence(sa).unwrap_err().to_string();
    assert!(e.contains("remove_sequence") && e.contains("another cache"), "{e}");
    assert_eq!(b.sequence_len(sb).unwrap(), 0);
    a.remove_sequence(sa).unwrap();
    assert!(matches!(a.sequence_len(sa), Err(Error::UnknownSequence(0))));
}

#[test]
fn non_finite_inputs_are_rejected_when_asked() {
    for (name, make) in algorithms() {
        let mut cfg = config();
        cfg.reject_non_finite = true;
        let mut cache = SpinCache::new_boxed(cfg, make()).unwrap();
        let s = cache.add_sequence().unwrap();
        cache.begin_step(&[StepInput { seq: s, new_tokens: 3 }]).unwrap();
        let q = Tensor::zeros((3, HQ, D), DType::F32, &Device::Cpu).unwrap();
        let kv = Tensor::zeros((3, HKV, D), DType::F32, &Device::Cpu).unwrap();
        let mut bad = vec![0f32; 3 * HKV * D];
        bad[(2 * HKV + 1) * D + 5] = f32::NAN;
        let bad = Tensor::from_vec(bad, (3, HKV, D), &Device::Cpu).unwrap();
        let e = cache.attend(0, &q, &bad, &kv).unwrap_err().to_string();
        assert!(
            e.contains("k [3, 2, 16] holds NaN at token 2, head 1, element 5"),
            "{name}: {e}"
        );
        // Invalid input: the step goes on.
        for l in 0..LAYERS {
            cache.attend(l, &q, &kv, &kv).unwrap();
        }
        cache.end_step().unwrap();
    }
}

#[cfg(feature = "fault-injection")]
mod injected {
    use super::*;
    use spinkv::fault;
    use spinkv::{PoolUsage, SeqId};

    /// What must not change when a call fails.
    fn snapshot(c: &SpinCache, seqs: &[SeqId]) -> (Vec<Option<usize>>, PoolUsage) {
        c.verify_accounting().unwrap();
        (seqs.iter().map(|&s| c.sequence_len(s).ok()).collect(), c.pool_usage())
    }

    fn zeros(t: usize, h: usize) -> Tensor {
        Tensor::zeros((t, h, D), DType::F32, &Device::Cpu).unwrap()
    }

    fn attend_all(c: &mut SpinCache, t: usize, r: &mut rand::rngs::StdRng) {
        for l in 0..LAYERS {
            let (q, k, v) = (
                randn(r, &[t, HQ, D], 1.0),
                randn(r, &[t, HKV, D], 1.0),
                randn(r, &[t, HKV, D], 1.0),
            );
            c.attend(l, &q, &k, &v).unwrap();
        }
    }

    /// A cache with two sequences of 21 and 13 tokens (partial pages), some pages in the
    /// fast tier.
    fn prepared(make: &Make) -> (SpinCache, Vec<SeqId>, rand::rngs::StdRng) {
        let mut r = rng(17);
        let mut c = SpinCache::new_boxed(config(), make()).unwrap();
        let s = vec![c.add_sequence().unwrap(), c.add_sequence().unwrap()];
        c.begin_step(&[
            StepInput {
                seq: s[0],
                new_tokens: 20,
            },
            StepInput {
                seq: s[1],
                new_tokens: 12,
            },
        ])
        .unwrap();
        attend_all(&mut c, 32, &mut r);
        c.end_step().unwrap();
        c.begin_step(&[
            StepInput {
                seq: s[0],
                new_tokens: 1,
            },
            StepInput {
                seq: s[1],
                new_tokens: 1,
            },
        ])
        .unwrap();
        attend_all(&mut c, 2, &mut r);
        c.end_step().unwrap();
        (c, s, r)
    }

    /// Calls `op` with the N-th device call failing, for N = 1, 2, … until `op` makes
    /// fewer than N calls; after each failure the state is unchanged and `op` succeeds
    /// on retry. Returns how many failures were injected.
    fn every_failure(
        what: &str,
        setup: &dyn Fn() -> (SpinCache, Vec<SeqId>, rand::rngs::StdRng),
        op: &dyn Fn(&mut SpinCache, &[SeqId]) -> spinkv::Result<()>,
    ) -> u64 {
        let mut n = 1;
        loop {
            let (mut c, s, _) = setup();
            let before = snapshot(&c, &s);
            fault::fail_nth_device_call(n);
            let r = op(&mut c, &s);
            let fired = !fault::armed();
            fault::clear();
            if !fired {
                r.unwrap_or_else(|e| panic!("{what}: failed without an injected failure: {e}"));
                assert!(n > 1, "{what}: makes no device call");
                return n - 1;
            }
            let e = r.expect_err("an injected failure must surface").to_string();
            assert!(e.contains("injected"), "{what}: call {n}: {e}");
            assert_eq!(snapshot(&c, &s), before, "{what}: state changed by failed call {n}");
            op(&mut c, &s).unwrap_or_else(|e| panic!("{what}: retry after failure {n}: {e}"));
            c.verify_accounting().unwrap();
            n += 1;
        }
    }

    /// A construction whose N-th allocation stage fails returns `Error::Alloc` naming
    /// the stage and its size, for every stage, and builds nothing (the next one works).
    #[test]
    fn a_failed_allocation_in_new_names_the_part_and_its_size() {
        for (name, make) in algorithms() {
            let mut parts = Vec::new();
            for n in 1.. {
                fault::fail_nth_device_call(n);
                let r = SpinCache::new_boxed(config(), make());
                let fired = !fault::armed();
                fault::clear();
                if !fired {
                    r.unwrap_or_else(|e| panic!("{name}: new failed without an injected failure: {e}"));
                    break;
                }
                let e = r.expect_err("an injected failure must surface");
                let msg = e.to_string();
                match &e {
                    // The budgets' upload after the tiers exist is not an allocation.
                    Error::Candle(_) => assert!(msg.contains("set_budgets"), "{name}: call {n}: {msg}"),
                    Error::Alloc { op, what, .. } => {
                        assert_eq!(*op, "SpinCache::new", "{name}: {msg}");
                        assert!(
                            msg.contains("injected") && msg.contains("with_fast_homes"),
                            "{name}: {msg}"
                        );
                        parts.push(what.clone());
                    }
                    e => panic!("{name}: call {n}: unexpected error {e:?}"),
                }
                assert!(std::error::Error::source(&e).is_some(), "{name}: {msg}");
                // Nothing half-built is left behind: a fresh construction works.
                SpinCache::new_boxed(config(), make()).unwrap();
            }
            let has = |s: &str| parts.iter().any(|p| p.contains(s));
            assert!(has("the metadata of "), "{name}: {parts:?}");
            assert!(has("the fast tier's LRU"), "{name}: {parts:?}");
            assert!(has("the device page tables"), "{name}: {parts:?}");
            // config(): 512 tokens, pages of 8, 2 layers × 2 KV heads: 256 host pages of
            // [2, 8, 16] f32 = 1 KiB each; the fast tier caches a quarter (at least a bucket).
            let c = config();
            assert!(
                has(&format!(
                    "the host tier: {} pages of [2, 8, 16] F32 (0.00 GiB)",
                    c.host_pages
                )),
                "{name}: {parts:?}"
            );
            assert!(
                has(&format!(
                    "the fast tier on Cpu: {} pages of [2, 8, 16] F32",
                    c.fast_pages
                )),
                "{name}: {parts:?}"
            );
        }
    }

    #[test]
    fn begin_remove_abort_and_end_are_atomic() {
        for (name, make) in algorithms() {
            let setup = || prepared(&make);
            let n = every_failure(
                &format!("{name} begin_step"),
                &setup,
                &|c: &mut SpinCache, s: &[SeqId]| {
                    c.begin_step(&[
                        StepInput {
                            seq: s[0],
                            new_tokens: 30,
                        },
                        StepInput {
                            seq: s[1],
                            new_tokens: 1,
                        },
                    ])
                },
            );
            assert!(n >= 2, "{name}: begin_step made {n} device calls");
            every_failure(
                &format!("{name} remove_sequence"),
                &setup,
                &|c: &mut SpinCache, s: &[SeqId]| c.remove_sequence(s[0]),
            );
            // abort_step and end_step inside an open step: the snapshot is taken in it.
            let in_step = || {
                let (mut c, s, mut r) = prepared(&make);
                c.begin_step(&[
                    StepInput {
                        seq: s[0],
                        new_tokens: 1,
                    },
                    StepInput {
                        seq: s[1],
                        new_tokens: 4,
                    },
                ])
                .unwrap();
                attend_all(&mut c, 5, &mut r);
                (c, s, r)
            };
            let n = every_failure(
                &format!("{name} abort_step"),
                &in_step,
                &|c: &mut SpinCache, _: &[SeqId]| c.abort_step(),
            );
            assert!(n >= 2, "{name}: abort_step made {n} device calls");
            every_failure(
                &format!("{name} end_step"),
                &in_step,
                &|c: &mut SpinCache, _: &[SeqId]| c.end_step().map(|_| ()),
            );
            // After the aborted step the lengths are back.
            let (mut c, s, _) = in_step();
            c.abort_step().unwrap();
            assert_eq!(c.sequence_len(s[0]).unwrap(), 21);
            assert_eq!(c.sequence_len(s[1]).unwrap(), 13);
        }
    }

    #[test]
    fn injected_failures_inside_attend_poison_the_step() {
        for (name, make) in algorithms() {
            let (mut c, s, mut r) = prepared(&make);
            let before = snapshot(&c, &s);
            c.begin_step(&[
                StepInput {
                    seq: s[0],
                    new_tokens: 1,
                },
                StepInput {
                    seq: s[1],
                    new_tokens: 1,
                },
            ])
            .unwrap();
            fault::fail_nth_device_call(2);
            let (q, k, v) = (randn(&mut r, &[2, HQ, D], 1.0), zeros(2, HKV), zeros(2, HKV));
            let e = c.attend(0, &q, &k, &v).unwrap_err().to_string();
            fault::clear();
            assert!(e.contains("injected"), "{name}: {e}");
            assert!(matches!(c.attend(1, &q, &k, &v), Err(Error::StepMisuse { .. })));
            c.abort_step().unwrap();
            assert_eq!(snapshot(&c, &s).0, before.0, "{name}");
            assert_eq!(snapshot(&c, &s).1.host_used, before.1.host_used, "{name}");
        }
    }

    type OpenStep = (Vec<(SeqId, usize)>, usize, bool);

    /// A model of what the cache must hold: live sequences and their lengths, and the
    /// open step's entries.
    #[derive(Default)]
    struct Model {
        lens: Vec<(SeqId, usize)>,
        /// The open step: (entries, layers attended, poisoned).
        step: Option<OpenStep>,
    }

    fn random_walk(seed: u64, ops: usize) {
        use rand::Rng;
        let mut r = rng(seed);
        let algos = algorithms();
        let (name, make) = &algos[seed as usize % algos.len()];
        let mut cfg = CacheConfig::new(LAYERS, 2, 1, 8)
            .with_page_size(8)
            .with_token_capacity(160, 0.3);
        cfg.max_sequences = 4;
        cfg.max_seq_len = 120;
        let mut c = SpinCache::new_boxed(cfg, make()).unwrap();
        let other = SpinCache::new(CacheConfig::new(1, 2, 1, 8), Dense::new())
            .unwrap()
            .add_sequence()
            .unwrap();
        let mut m = Model::default();
        let mut failures = 0;
        let (mut attends, mut ends, mut aborts) = (0, 0, 0);
        for i in 0..ops {
            let armed = r.random_bool(0.15);
            if armed {
                fault::fail_nth_device_call(r.random_range(1..4));
            }
            let what = r.random_range(0..100);
            let ctx = format!("{name} seed {seed} op {i}");
            match (&mut m.step, what) {
                (None, 0..10) => match c.add_sequence() {
                    Ok(s) => m.lens.push((s, 0)),
                    Err(e) => assert!(m.lens.len() == 4, "{ctx}: add_sequence: {e}"),
                },
                (None, 10..18) if !m.lens.is_empty() => {
                    let k = r.random_range(0..m.lens.len());
                    if c.remove_sequence(m.lens[k].0).is_ok() {
                        m.lens.remove(k);
                    }
                }
                (None, 18..22) => {
                    let e = c.begin_step(&[StepInput {
                        seq: other,
                        new_tokens: 1,
                    }]);
                    assert!(e.is_err(), "{ctx}: a foreign SeqId was accepted");
                }
                (None, _) if !m.lens.is_empty() => {
                    let mut entries = Vec::new();
                    for &(s, _) in &m.lens {
                        if r.random_bool(0.6) {
                            let n = if r.random_bool(0.7) { 1 } else { r.random_range(2..30) };
                            entries.push((s, n));
                        }
                    }
                    let inputs: Vec<StepInput> = entries
                        .iter()
                        .map(|&(seq, new_tokens)| StepInput { seq, new_tokens })
                        .collect();
                    if !inputs.is_empty() && c.begin_step(&inputs).is_ok() {
                        for &(s, n) in &entries {
                            let l = m.lens.iter_mut().find(|x| x.0 == s).unwrap();
                            l.1 += n;
                        }
                        m.step = Some((entries, 0, false));
                    }
                }
                (Some((entries, layer, poisoned)), _) => {
                    let t: usize = entries.iter().map(|e| e.1).sum();
                    let pick = r.random_range(0..20);
                    if pick < 19 && *layer < LAYERS && !*poisoned {
                        let (q, k, v) = (
                            randn(&mut r, &[t, 2, 8], 1.0),
                            randn(&mut r, &[t, 1, 8], 1.0),
                            randn(&mut r, &[t, 1, 8], 1.0),
                        );
                        match c.attend(*layer, &q, &k, &v) {
                            Ok(o) => {
                                assert!(!*poisoned, "{ctx}: attend on a poisoned step");
                                assert_eq!(o.dims(), [t, 2, 8]);
                                *layer += 1;
                                attends += 1;
                            }
                            Err(_) => *poisoned = true,
                        }
                    } else if pick < 17 && *layer == LAYERS && !*poisoned {
                        if c.end_step().is_ok() {
                            m.step = None;
                            ends += 1;
                        }
                    } else if let Ok(()) = c.abort_step() {
                        for (s, n) in entries.iter() {
                            let l = m.lens.iter_mut().find(|x| x.0 == *s).unwrap();
                            l.1 -= n;
                        }
                        m.step = None;
                        aborts += 1;
                    } else {
                        // A failed abort leaves the step open and poisoned.
                        *poisoned = true;
                    }
                }
                _ => {}
            }
            if armed && !fault::armed() {
                failures += 1;
            }
            fault::clear();
            c.verify_accounting().unwrap_or_else(|e| panic!("{ctx}: {e}"));
            for &(s, len) in &m.lens {
                assert_eq!(c.sequence_len(s).unwrap(), len, "{ctx}: sequence_len");
            }
            let pages: usize = m.lens.iter().map(|&(_, l)| l.div_ceil(8)).sum::<usize>() * LAYERS;
            assert_eq!(c.pool_usage().host_used, pages, "{ctx}: host pages");
        }
        eprintln!(
            "{name} seed {seed}: {attends} attends, {ends} steps ended, {aborts} aborted, {failures} injected failures"
        );
        assert!(failures > 0 && attends > ops / 10 && ends > ops / 50 && aborts > ops / 100);
    }

    #[test]
    fn random_operations_with_injected_failures_keep_the_accounting() {
        for seed in 0..5 {
            random_walk(seed, 2000);
        }
    }

    /// `DeviceLru::set_budgets` uploads only budgets that changed (a step's end sets them
    /// every step); a failed upload leaves the old ones, so setting them again retries.
    #[test]
    fn setting_the_same_budgets_again_makes_no_device_call() {
        let mut lru = spinkv::tiered::DeviceLru::new(4, 2, 3, 64, &Device::Cpu).unwrap();
        let calls = || fault::device_calls();
        let n0 = calls();
        lru.set_budgets(&[u32::MAX; 3]).unwrap();
        assert_eq!(calls(), n0, "the initial budgets again");
        lru.set_budgets(&[5, 6, 7]).unwrap();
        assert_eq!(calls(), n0 + 1);
        lru.set_budgets(&[5, 6, 7]).unwrap();
        assert_eq!(calls(), n0 + 1, "the same budgets again");
        fault::fail_nth_device_call(1);
        assert!(lru.set_budgets(&[1, 2, 3]).is_err());
        fault::clear();
        let n1 = calls();
        lru.set_budgets(&[1, 2, 3]).unwrap();
        assert_eq!(calls(), n1 + 1, "after a failed upload the same budgets are uploaded");
        let e = lru.set_budgets(&[1, 2]).unwrap_err().to_string();
        assert!(e.contains("set_budgets") && e.contains("max_owners = 3"), "{e}");
    }
}
