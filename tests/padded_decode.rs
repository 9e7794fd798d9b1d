//! Padded decode steps (`SparseKvCache::begin_padded_decode`), the form CUDA graphs
//! capture, against ordinary steps on the CPU:
//! - the real rows' outputs equal an ordinary cache's for dense, Quest and Streaming (within 1e-6,
//!   f32), over batch sizes that pad (3 → 4, 5 → 8), page boundaries, a sequence leaving
//!   and one joining mid-run, with a fast tier too small for the KV (misses and
//!   evictions); padding rows (garbage inputs at scale 1000) come out finite and change
//!   nothing; the counters and the pool accounting agree;
//! - misuse and bad input are clear errors; an aborted padded step frees its pages; the
//!   caller's words (`begin_padded_decode_with`) come back on the device; invalid input
//!   before the first layer does not use up the step's plan expansion (done in its first
//!   `attend`);
//! - (feature `fault-injection`) a padded step failing on any of its device calls aborts
//!   cleanly and the rerun equals a twin cache where nothing failed (also ShadowKV in its
//!   device mode; its other padded tests are in `tests/shadowkv_device.rs`).

mod common;

use common::harness::{add_to_each, padded_step, random_step};
use common::{max_abs_diff, rng};
use spinkv::partition::{
    Dense, InfLlm, InfLlmConfig, Quest, QuestConfig, ShadowKv, ShadowKvConfig, SparseAlgorithm, Streaming,
    StreamingConfig,
};
use spinkv::{CacheConfig, Error, PaddedShape, SeqId, SparseKvCache, SpinCache, StepInput};

fn cfg() -> CacheConfig {
    // 2 layers, 4 query heads over 2 KV heads, head_dim 16, pages of 8 tokens; the fast
    // tier holds a quarter of the host tier.
    CacheConfig::new(2, 4, 2, 16)
        .with_page_size(8)
        .with_token_capacity(2048, 0.25)
}

/// The configuration of `name`'s caches: [`cfg`], but ShadowKV gets a fast tier that
/// holds every page (its device mode, the one that runs padded steps).
fn cfg_for(name: &str) -> CacheConfig {
    if name == "shadowkv" {
        CacheConfig::new(2, 4, 2, 16)
            .with_page_size(8)
            .with_token_capacity(2048, 1.0)
    } else {
        cfg()
    }
}

fn algo(name: &str) -> Box<dyn SparseAlgorithm> {
    match name {
        "shadowkv" => Box::new(common::algo::small_shadowkv()),
        "dense" => Box::new(Dense::new()),
        "streaming" => Box::new(Streaming::new(StreamingConfig {
            sink_tokens: 8,
            window_tokens: 20,
        })),
        // Blocks of 2 pages, a window of 16: the prompts finalize blocks, and so do the
        // decode steps.
        "infllm" => Box::new(
            InfLlm::new(InfLlmConfig {
                block_tokens: 16,
                sink_tokens: 8,
                window_tokens: 16,
                topk_blocks: 2,
                repr_topk: 3,
            })
            .unwrap(),
        ),
        _ => Box::new(Quest::new(QuestConfig {
            budget_tokens: 32,
            sink_tokens: 8,
            window_tokens: 8,
            dense_layers: 1,
            shared_across_heads: false,
            ..Default::default()
        })),
    }
}

fn decode_inputs(seqs: &[SeqId]) -> Vec<StepInput> {
    seqs.iter().map(|&seq| StepInput { seq, new_tokens: 1 }).collect()
}

/// Two caches running `name` with the same configuration.
fn twins(name: &str) -> [SpinCache; 2] {
    [
        SpinCache::new_boxed(cfg_for(name), algo(name)).unwrap(),
        SpinCache::new_boxed(cfg_for(name), algo(name)).unwrap(),
    ]
}

/// A new sequence with a prompt of `len` tokens in both caches.
fn add_both(caches: &mut [SpinCache; 2], seqs: &mut [Vec<SeqId>; 2], len: usize) {
    add_to_each(caches, seqs, len);
}

#[test]
fn padded_decode_equals_ordinary_decode() {
    for name in ["dense", "quest", "streaming", "infllm"] {
        let mut caches = twins(name);
        let mut seqs = [Vec::new(), Vec::new()];
        for &len in &[37usize, 9, 70] {
            add_both(&mut caches, &mut seqs, len);
        }
        let mut pad = rng(999);
        let mut shapes = Vec::new();
        for step in 0..14u64 {
            if step == 6 {
                // One sequence leaves, three join (3 rows pad to 4, then 5 rows to 8).
                for (c, s) in caches.iter_mut().zip(seqs.iter_mut()) {
                    c.remove_sequence(s.remove(1)).unwrap();
                }
                for &len in &[5usize, 130, 66] {
                    add_both(&mut caches, &mut seqs, len);
                }
            }
            let (ia, ib) = (decode_inputs(&seqs[0]), decode_inputs(&seqs[1]));
            let shape = caches[1]
                .padded_shape(&ib)
                .expect("dense, Quest and Streaming run padded");
            assert!(shape.batch >= ib.len() && shape.batch.is_power_of_two(), "{shape:?}");
            assert_eq!(shape.pages % 64, 0, "{shape:?}");
            shapes.push(shape);
            let eager = random_step(&mut caches[0], &ia, &mut rng(100 + step));
            let padded = padded_step(&mut caches[1], &ib, shape, &mut rng(100 + step), &mut pad);
            for (layer, (e, p)) in eager.iter().zip(&padded).enumerate() {
                let n = ia.len();
                let real = p.out.narrow(0, 0, n).unwrap();
                let err = max_abs_diff(&e.out, &real);
                assert!(err <= 1e-6, "{name} step {step} layer {layer}: padded differs by {err}");
                if shape.batch > n {
                    let rest = p.out.narrow(0, n, shape.batch - n).unwrap();
                    let vals = rest.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert!(vals.iter().all(|x| x.is_finite()), "{name}: padding rows not finite");
                }
            }
        }
        assert!(shapes.iter().any(|s| s.batch == 4) && shapes.iter().any(|s| s.batch == 8));
        let (sa, sb) = (caches[0].stats(), caches[1].stats());
        assert_eq!(
            (sa.steps, sa.decode_rows, sa.pages_attended, sa.pages_available),
            (sb.steps, sb.decode_rows, sb.pages_attended, sb.pages_available),
            "{name}: counters"
        );
        assert_eq!(
            (sa.hits, sa.misses, sa.spilled),
            (sb.hits, sb.misses, sb.spilled),
            "{name}: tier counters"
        );
        assert!(
            sb.misses > 0,
            "{name}: the fast tier should be too small to hold the KV"
        );
        for (c, seqs) in caches.iter().zip(&seqs) {
            c.verify_accounting().unwrap();
            let lens: Vec<usize> = seqs.iter().map(|&s| c.sequence_len(s).unwrap()).collect();
            assert_eq!(lens, vec![37 + 14, 70 + 14, 5 + 8, 130 + 8, 66 + 8]);
        }
        assert_eq!(caches[0].pool_usage().host_used, caches[1].pool_usage().host_used);
    }
}

#[test]
fn padded_misuse_and_bad_input_are_clear_errors() {
    let mut c = SpinCache::new_boxed(cfg(), algo("quest")).unwrap();
    let s = c.add_sequence().unwrap();
    random_step(&mut c, &[StepInput { seq: s, new_tokens: 21 }], &mut rng(1));
    let one = decode_inputs(&[s]);
    let shape = c.padded_shape(&one).unwrap();
    assert_eq!(shape, PaddedShape { batch: 1, pages: 64 });
    let msg = |e: Error| e.to_string();
    // Two tokens per row.
    let two = [StepInput { seq: s, new_tokens: 2 }];
    assert!(c.padded_shape(&two).is_none());
    let e = msg(c.begin_padded_decode(&two, shape).unwrap_err());
    assert!(e.contains("begin_padded_decode") && e.contains("2 tokens"), "{e}");
    // A shape smaller than the step.
    let e = msg(c
        .begin_padded_decode(&one, PaddedShape { batch: 1, pages: 2 })
        .unwrap_err());
    assert!(e.contains("smaller than the step needs"), "{e}");
    // Replayed without a padded step.
    let e = msg(c.padded_step_replayed().unwrap_err());
    assert!(e.contains("no padded decode step is open"), "{e}");
    // q of the real rows only, where the shape has more rows.
    let s2 = c.add_sequence().unwrap();
    random_step(&mut c, &[StepInput { seq: s2, new_tokens: 8 }], &mut rng(2));
    let both = decode_inputs(&[s, s2]);
    let shape2 = PaddedShape { batch: 4, pages: 64 };
    c.begin_padded_decode(&both, shape2).unwrap();
    let q = candle_core::Tensor::zeros((2, 4, 16), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let kv = candle_core::Tensor::zeros((2, 2, 16), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let e = msg(c.attend(0, &q, &kv, &kv).unwrap_err());
    assert!(e.contains("[T=4"), "{e}");
    // After one attended layer a replay is refused (attend or replay, not both).
    let q = q.pad_with_zeros(0, 0, 2).unwrap();
    let kv = kv.pad_with_zeros(0, 0, 2).unwrap();
    c.attend(0, &q, &kv, &kv).unwrap();
    let e = msg(c.padded_step_replayed().unwrap_err());
    assert!(e.contains("attended already"), "{e}");
    // Abort frees the step's pages (s2 crossed into a new page).
    c.abort_step().unwrap();
    c.verify_accounting().unwrap();
    assert_eq!((c.sequence_len(s).unwrap(), c.sequence_len(s2).unwrap()), (21, 8));
    // An algorithm whose selection needs the host (ShadowKV in host mode: this fast tier
    // holds a quarter of the KV, and it rebuilds keys there) has no padded steps
    // (`tests/shadowkv_device.rs` has its device mode's).
    let shadow = ShadowKv::new(ShadowKvConfig {
        rank: 16,
        sparse_budget_tokens: 64,
        outlier_chunks: 2,
        ..Default::default()
    })
    .unwrap();
    let mut inf = SpinCache::new_boxed(cfg(), Box::new(shadow)).unwrap();
    let t = inf.add_sequence().unwrap();
    random_step(&mut inf, &[StepInput { seq: t, new_tokens: 9 }], &mut rng(3));
    assert!(inf.padded_shape(&decode_inputs(&[t])).is_none());
    let e = msg(inf.begin_padded_decode(&decode_inputs(&[t]), shape).unwrap_err());
    assert!(e.contains("cannot run padded decode steps"), "{e}");
}

/// A padded step's plan and RoPE tables are built in its first `attend`: an invalid first
/// call (refused, the step still usable) must not use that up, so the step run after it
/// equals a twin's that never saw it.
#[test]
fn invalid_input_before_a_padded_steps_first_layer_changes_nothing() {
    use common::harness::try_padded_step_with;
    for name in ["dense", "quest"] {
        let mut caches = twins(name);
        let mut seqs = [Vec::new(), Vec::new()];
        for &len in &[29usize, 8, 61] {
            add_both(&mut caches, &mut seqs, len);
        }
        for step in 0..2u64 {
            let ia = decode_inputs(&seqs[0]);
            let ib = decode_inputs(&seqs[1]);
            let shape = caches[1].padded_shape(&ib).unwrap();
            let a = padded_step(&mut caches[0], &ia, shape, &mut rng(20 + step), &mut rng(5));
            let b = try_padded_step_with(&mut caches[1], &ib, shape, &mut rng(20 + step), &mut rng(5), |c| {
                let cfg = c.config().clone();
                let bad = candle_core::Tensor::zeros((1, 1, 1), cfg.dtype, &cfg.device).unwrap();
                let e = c.attend(0, &bad, &bad, &bad).unwrap_err().to_string();
                assert!(e.contains("attend"), "{e}");
                Ok(())
            })
            .unwrap();
            for (layer, (x, y)) in a.iter().zip(&b).enumerate() {
                let err = max_abs_diff(&x.out, &y.out);
                assert!(err <= 1e-6, "{name} step {step} layer {layer}: outputs differ by {err}");
            }
        }
    }
}

/// `begin_padded_decode_with` hands the caller's words back on the device, replaced each
/// step once the step is prepared (`prepare_padded_step`: again is a no-op; without an
/// open padded step, an error); their count is fixed per shape (another count is
/// refused, changing nothing).
#[test]
fn padded_steps_carry_the_callers_words() {
    let mut c = SpinCache::new_boxed(cfg(), algo("dense")).unwrap();
    let s = c.add_sequence().unwrap();
    random_step(&mut c, &[StepInput { seq: s, new_tokens: 13 }], &mut rng(4));
    let one = decode_inputs(&[s]);
    let shape = c.padded_shape(&one).unwrap();
    let words = |k: u32| -> Vec<u32> { (0..7).map(|i| 1000 * k + i).collect() };
    for k in 1..4u32 {
        let got = c.begin_padded_decode_with(&one, shape, &words(k)).unwrap();
        c.prepare_padded_step().unwrap();
        c.prepare_padded_step().unwrap();
        assert_eq!(got.to_vec1::<u32>().unwrap(), words(k), "step {k}");
        c.abort_step().unwrap();
    }
    let e = c.prepare_padded_step().unwrap_err().to_string();
    assert!(
        e.contains("prepare_padded_step") && e.contains("no padded decode step"),
        "{e}"
    );
    let before = (c.pool_usage(), c.sequence_len(s).unwrap());
    let e = c
        .begin_padded_decode_with(&one, shape, &[1, 2, 3])
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 extra words") && e.contains("carry 7"), "{e}");
    assert_eq!((c.pool_usage(), c.sequence_len(s).unwrap()), before);
    // No step is open: an ordinary step runs.
    random_step(&mut c, &one, &mut rng(5));
    c.verify_accounting().unwrap();
}

/// With the `fault-injection` feature: a padded step whose N-th device call fails (for
/// every N it makes: begin, the preparation — the staged words' copy and the plan
/// expansion, in `prepare_padded_step` or the first attend —, each layer's store /
/// resolve / fetch, end) is aborted, leaves lengths, pool usage and accounting as they
/// were, and the step run again gives exactly the outputs of a twin cache where nothing
/// failed.
#[cfg(feature = "fault-injection")]
#[test]
fn a_padded_step_that_fails_on_any_device_call_aborts_cleanly() {
    use common::harness::try_padded_step_with;
    use spinkv::fault;
    for name in ["dense", "quest", "streaming", "infllm", "shadowkv"] {
        let mut caches = twins(name);
        let mut seqs = [Vec::new(), Vec::new()];
        for &len in &[29usize, 8, 61] {
            add_both(&mut caches, &mut seqs, len);
        }
        if name == "shadowkv" {
            // Its first decode step (the compression) is an ordinary one.
            for (c, s) in caches.iter_mut().zip(&seqs) {
                random_step(c, &decode_inputs(s), &mut rng(3));
            }
        }
        for step in 0..3u64 {
            let ia = decode_inputs(&seqs[0]);
            let ib = decode_inputs(&seqs[1]);
            let shape = caches[1].padded_shape(&ib).unwrap();
            padded_step(&mut caches[0], &ia, shape, &mut rng(50 + step), &mut rng(7));
            let (lens, used) = (
                seqs[1]
                    .iter()
                    .map(|&s| caches[1].sequence_len(s).unwrap())
                    .collect::<Vec<_>>(),
                caches[1].pool_usage(),
            );
            let mut n = 1;
            loop {
                fault::fail_nth_device_call(n);
                let c = &mut caches[1];
                // Odd steps prepare the step before its first layer, as the engine does;
                // even ones leave it to the first attend.
                let prepare = |c: &mut dyn SparseKvCache| {
                    if step % 2 == 1 {
                        c.prepare_padded_step()
                    } else {
                        Ok(())
                    }
                };
                let failed = match try_padded_step_with(c, &ib, shape, &mut rng(50 + step), &mut rng(7), prepare) {
                    Ok(_) => false,
                    Err(_) => {
                        // Abort the step if one is open (`StepMisuse`: the begin failed,
                        // none is); aborting may itself hit the armed failure: retry.
                        loop {
                            match c.abort_step() {
                                Ok(()) | Err(Error::StepMisuse { .. }) => break,
                                Err(_) => {}
                            }
                        }
                        true
                    }
                };
                let fired = !fault::armed();
                fault::clear();
                if !fired {
                    // No call failed: this run completed the step.
                    assert!(!failed);
                    break;
                }
                assert!(failed, "{name} step {step}: call {n} failed but the step went on");
                let c = &caches[1];
                let now: Vec<usize> = seqs[1].iter().map(|&s| c.sequence_len(s).unwrap()).collect();
                assert_eq!(now, lens, "{name} step {step} call {n}: lengths restored");
                assert_eq!(c.pool_usage().host_used, used.host_used, "{name} step {step} call {n}");
                c.verify_accounting().unwrap();
                n += 1;
            }
            assert!(n > 5, "{name}: a padded step makes several device calls ({n})");
            // The completed run above is the step: compare the caches' next step.
            let a = padded_step(&mut caches[0], &ia, shape, &mut rng(90 + step), &mut rng(8));
            let b = padded_step(&mut caches[1], &ib, shape, &mut rng(90 + step), &mut rng(8));
            for (x, y) in a.iter().zip(&b) {
                let err = max_abs_diff(&x.out, &y.out);
                assert!(
                    err <= 1e-6,
                    "{name} step {step}: after the failures the outputs differ by {err}"
                );
            }
        }
    }
}
