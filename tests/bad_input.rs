//! Bad input returns a clear `Err` naming the op and the shapes; nothing panics.

#![allow(
    clippy::needless_range_loop,
    clippy::explicit_counter_loop,
    clippy::too_many_arguments
)]

mod common;

use candle_core::{DType, Device, Tensor};
use spinkv::ops::{self, PageList};
use spinkv::partition::{Dense, Quest, QuestConfig};
use spinkv::{CacheConfig, Error, SeqId, SparseKvCache, SpinCache, StepInput};

fn cache() -> (SpinCache, SeqId) {
    let mut c = SpinCache::new(CacheConfig::new(2, 6, 2, 64), Dense::new()).unwrap();
    let s = c.add_sequence().unwrap();
    (c, s)
}

fn t(dims: &[usize]) -> Tensor {
    Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap()
}

fn msg<T: std::fmt::Debug>(r: spinkv::Result<T>) -> String {
    r.expect_err("must fail").to_string()
}

#[test]
fn attend_wrong_rank_names_op_and_shape() {
    let (mut c, s) = cache();
    c.begin_step(&[StepInput { seq: s, new_tokens: 3 }]).unwrap();
    let m = msg(c.attend(0, &t(&[3, 6 * 64]), &t(&[3, 2, 64]), &t(&[3, 2, 64])));
    assert!(m.contains("attend") && m.contains("[3, 384]"), "{m}");
}

#[test]
fn attend_wrong_dtype() {
    let (mut c, s) = cache();
    c.begin_step(&[StepInput { seq: s, new_tokens: 3 }]).unwrap();
    let q = t(&[3, 6, 64]).to_dtype(DType::F16).unwrap();
    let m = msg(c.attend(0, &q, &t(&[3, 2, 64]), &t(&[3, 2, 64])));
    assert!(m.contains("dtype") && m.contains("F16"), "{m}");
}

#[test]
fn attend_wrong_head_counts() {
    let (mut c, s) = cache();
    c.begin_step(&[StepInput { seq: s, new_tokens: 3 }]).unwrap();
    let m = msg(c.attend(0, &t(&[3, 6, 64]), &t(&[3, 3, 64]), &t(&[3, 2, 64])));
    assert!(m.contains("k must be") && m.contains("[3, 3, 64]"), "{m}");
    let m = msg(c.attend(0, &t(&[3, 4, 64]), &t(&[3, 2, 64]), &t(&[3, 2, 64])));
    assert!(m.contains("q must be"), "{m}");
}

#[test]
fn attend_wrong_token_count() {
    let (mut c, s) = cache();
    c.begin_step(&[StepInput { seq: s, new_tokens: 3 }]).unwrap();
    let m = msg(c.attend(0, &t(&[4, 6, 64]), &t(&[4, 2, 64]), &t(&[4, 2, 64])));
    assert!(m.contains("T=3"), "{m}");
}

#[test]
fn attend_layer_out_of_range() {
    let (mut c, s) = cache();
    c.begin_step(&[StepInput { seq: s, new_tokens: 1 }]).unwrap();
    let m = msg(c.attend(2, &t(&[1, 6, 64]), &t(&[1, 2, 64]), &t(&[1, 2, 64])));
    assert!(m.contains("layer 2") && m.contains("2 layers"), "{m}");
}

#[test]
fn attend_outside_a_step() {
    let (mut c, _) = cache();
    let r = c.attend(0, &t(&[1, 6, 64]), &t(&[1, 2, 64]), &t(&[1, 2, 64]));
    assert!(matches!(r, Err(Error::StepMisuse { .. })), "{r:?}");
}

#[test]
fn attend_same_layer_twice_and_end_step_early() {
    let (mut c, s) = cache();
    c.begin_step(&[StepInput { seq: s, new_tokens: 1 }]).unwrap();
    c.attend(0, &t(&[1, 6, 64]), &t(&[1, 2, 64]), &t(&[1, 2, 64])).unwrap();
    assert!(matches!(
        c.attend(0, &t(&[1, 6, 64]), &t(&[1, 2, 64]), &t(&[1, 2, 64])),
        Err(Error::StepMisuse { .. })
    ));
    let m = msg(c.end_step());
    assert!(m.contains("layer 1 was not attended"), "{m}");
    c.abort_step().unwrap();
    assert_eq!(c.sequence_len(s).unwrap(), 0);
}

#[test]
fn begin_step_twice() {
    let (mut c, s) = cache();
    c.begin_step(&[StepInput { seq: s, new_tokens: 1 }]).unwrap();
    assert!(matches!(
        c.begin_step(&[StepInput { seq: s, new_tokens: 1 }]),
        Err(Error::StepMisuse { .. })
    ));
}

#[test]
fn unknown_and_removed_sequences() {
    let (mut c, s) = cache();
    let (_, foreign): (SpinCache, SeqId) = cache();
    let m = msg(c.begin_step(&[StepInput {
        seq: foreign,
        new_tokens: 1,
    }]));
    assert!(m.contains("another cache"), "{m}");
    c.remove_sequence(s).unwrap();
    assert!(matches!(c.remove_sequence(s), Err(Error::UnknownSequence(_))));
    assert!(matches!(
        c.begin_step(&[StepInput { seq: s, new_tokens: 1 }]),
        Err(Error::UnknownSequence(_))
    ));
    assert!(matches!(c.sequence_len(s), Err(Error::UnknownSequence(_))));
}

#[test]
fn zero_tokens_duplicate_sequence_and_too_long() {
    let (mut c, s) = cache();
    assert!(msg(c.begin_step(&[StepInput { seq: s, new_tokens: 0 }])).contains("0 new tokens"));
    assert!(
        msg(c.begin_step(&[StepInput { seq: s, new_tokens: 1 }, StepInput { seq: s, new_tokens: 1 }]))
            .contains("twice")
    );
    assert!(msg(c.begin_step(&[StepInput {
        seq: s,
        new_tokens: 9000
    }]))
    .contains("max_seq_len"));
    assert!(msg(c.begin_step(&[])).contains("at least one"));
}

#[test]
fn pool_exhausted_is_back_pressure() {
    let cfg = CacheConfig::new(1, 2, 1, 16).with_token_capacity(64, 1.0);
    let mut c = SpinCache::new(cfg, Dense::new()).unwrap();
    let a = c.add_sequence().unwrap();
    let b = c.add_sequence().unwrap();
    c.begin_step(&[StepInput { seq: a, new_tokens: 48 }]).unwrap();
    c.abort_step().unwrap();
    c.begin_step(&[StepInput { seq: a, new_tokens: 48 }]).unwrap();
    let m = Tensor::zeros((48, 2, 16), DType::F32, &Device::Cpu).unwrap();
    let kv = Tensor::zeros((48, 1, 16), DType::F32, &Device::Cpu).unwrap();
    c.attend(0, &m, &kv, &kv).unwrap();
    c.end_step().unwrap();
    let r = c.begin_step(&[StepInput { seq: b, new_tokens: 20 }]);
    match r {
        Err(e @ Error::PoolExhausted { needed: 2, free: 1, .. }) => assert!(e.to_string().contains("back-pressure")),
        other => panic!("expected PoolExhausted, got {other:?}"),
    }
    // After removing `a`, the same request fits.
    c.remove_sequence(a).unwrap();
    c.begin_step(&[StepInput { seq: b, new_tokens: 20 }]).unwrap();
}

#[test]
fn add_or_remove_inside_a_step() {
    let (mut c, s) = cache();
    c.begin_step(&[StepInput { seq: s, new_tokens: 1 }]).unwrap();
    assert!(matches!(c.add_sequence(), Err(Error::StepMisuse { .. })));
    assert!(matches!(c.remove_sequence(s), Err(Error::StepMisuse { .. })));
}

#[test]
fn bad_configs_are_rejected_at_construction() {
    let mut cfg = CacheConfig::new(2, 6, 4, 64);
    assert!(msg(SpinCache::new(cfg.clone(), Dense::new())).contains("multiple of num_kv_heads"));
    cfg.num_kv_heads = 2;
    cfg.page_size = 12;
    assert!(msg(SpinCache::new(cfg.clone(), Dense::new())).contains("page_size (12)"));
    cfg.page_size = 16;
    cfg.dtype = DType::U32;
    assert!(msg(SpinCache::new(cfg.clone(), Dense::new())).contains("dtype"));
    cfg.dtype = DType::F32;
    let q = Quest::new(QuestConfig {
        budget_tokens: 32,
        sink_tokens: 16,
        window_tokens: 32,
        ..Default::default()
    });
    assert!(msg(SpinCache::new(cfg.clone(), q)).contains("fewer than sink"));
    // A head dim whose pool size overflows is an error, not a panic or a wrapped size.
    cfg.head_dim = 1 << 60;
    assert!(msg(SpinCache::new(cfg, Dense::new())).contains("overflow"));
}

#[test]
fn wrong_device_is_rejected() {
    // Without a GPU (or without the `cuda` feature) asking for one is a clear error.
    match Device::new_cuda(0) {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(gpu) => {
            let (mut c, s) = cache();
            c.begin_step(&[StepInput { seq: s, new_tokens: 1 }]).unwrap();
            let q = Tensor::zeros((1, 6, 64), DType::F32, &gpu).unwrap();
            let m = msg(c.attend(0, &q, &t(&[1, 2, 64]), &t(&[1, 2, 64])));
            assert!(m.contains("is on"), "{m}");
        }
    }
}

#[test]
fn ops_validate_their_inputs() {
    let pool = t(&[4, 2, 16, 64]);
    let m = msg(ops::paged_append(
        &pool,
        &t(&[3, 2, 32]),
        &t(&[3, 2, 32]),
        &Tensor::zeros((3, 2), DType::U32, &Device::Cpu).unwrap(),
    ));
    assert!(m.contains("paged_append") && m.contains("[3, 2, 32]"), "{m}");
    let list = PageList {
        pages: Tensor::zeros((1, 4, 2, 2), DType::U32, &Device::Cpu).unwrap(),
        queries: Tensor::zeros((1, 2), DType::U32, &Device::Cpu).unwrap(),
        kv_limit: Tensor::zeros(1, DType::U32, &Device::Cpu).unwrap(),
    };
    let m = msg(ops::sparse_paged_attention(&t(&[1, 6, 64]), &pool, &list, 1.0));
    assert!(
        m.contains("sparse_paged_attention") && m.contains("not a multiple"),
        "{m}"
    );
    let m = msg(ops::topk_indices(&t(&[2, 8]), 0));
    assert!(m.contains("topk_indices"), "{m}");
    let m = msg(ops::quest_page_scores(
        &t(&[2, 6, 64]),
        &t(&[4, 2, 32]),
        &Tensor::zeros((2, 2, 3), DType::U32, &Device::Cpu).unwrap(),
        0,
        1,
    ));
    assert!(m.contains("quest_page_scores") && m.contains("meta"), "{m}");
    let dst = Tensor::zeros((3, 2), DType::U32, &Device::Cpu).unwrap();
    let (k, v) = (t(&[3, 2, 64]), t(&[3, 2, 64]));
    let m = msg(ops::paged_append_with_minmax(
        &pool,
        &k,
        &v,
        &dst,
        &t(&[4, 2, 32]),
        &dst,
    ));
    assert!(
        m.contains("paged_append_with_minmax") && m.contains("meta") && m.contains("[4, 2, 32]"),
        "{m}"
    );
    let m = msg(ops::paged_append_with_minmax(
        &pool,
        &k,
        &v,
        &dst,
        &t(&[4, 2, 64]),
        &Tensor::zeros((3, 1), DType::U32, &Device::Cpu).unwrap(),
    ));
    assert!(
        m.contains("paged_append_with_minmax") && m.contains("meta_dst") && m.contains("[3, 1]"),
        "{m}"
    );
    // Out-of-range slot indices inside an index tensor are errors, not panics.
    let bad = Tensor::new(&[[999u32 * 16, 0]], &Device::Cpu)
        .unwrap()
        .reshape((1, 2))
        .unwrap();
    let r = ops::paged_append(&pool, &t(&[1, 2, 64]), &t(&[1, 2, 64]), &bad);
    assert!(r.is_err());
}

fn u32s(dims: &[usize]) -> Tensor {
    Tensor::zeros(dims, DType::U32, &Device::Cpu).unwrap()
}

/// Runs `f`, turning a panic into a test failure that names `what` (so one test reports
/// every op that panics, not just the first).
fn no_panic<T: std::fmt::Debug>(what: &str, f: impl FnOnce() -> spinkv::Result<T>) -> Option<String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Some(format!("{what}: accepted ({v:?})")),
        Ok(Err(e)) => {
            let m = e.to_string();
            assert!(!m.is_empty());
            None
        }
        Err(_) => Some(format!("{what}: panicked")),
    }
}

#[test]
fn ops_reject_a_page_size_or_head_dim_of_zero() {
    let mut bad = Vec::new();
    for (p, d) in [(0, 64), (16, 0), (0, 0)] {
        let pool = t(&[4, 2, p, d]);
        let k = t(&[3, 2, d]);
        let dst = u32s(&[3, 2]);
        bad.extend(no_panic(&format!("paged_append P={p} D={d}"), || {
            ops::paged_append(&pool, &k, &k, &dst)
        }));
        bad.extend(no_panic(&format!("paged_append_with_minmax P={p} D={d}"), || {
            ops::paged_append_with_minmax(&pool, &k, &k, &dst, &t(&[4, 2, d]), &dst)
        }));
        bad.extend(no_panic(&format!("quest_meta_update P={p} D={d}"), || {
            ops::quest_meta_update(&t(&[4, 2, d]), &k, &dst, p)
        }));
        if d == 0 {
            bad.extend(no_panic("quest_page_scores D=0", || {
                ops::quest_page_scores(&t(&[1, 4, d]), &t(&[4, 2, d]), &u32s(&[1, 2, 3]), 0, 1)
            }));
            bad.extend(no_panic("causal_self_attention D=0", || {
                ops::causal_self_attention(&t(&[3, 4, d]), &k, &k, 1.0)
            }));
        }
        let list = PageList {
            pages: u32s(&[1, 2, 2, 2]),
            queries: u32s(&[1, 2]),
            kv_limit: Tensor::new(&[1u32], &Device::Cpu).unwrap(),
        };
        bad.extend(no_panic(&format!("sparse_paged_attention P={p} D={d}"), || {
            ops::sparse_paged_attention(&t(&[1, 4, d]), &pool, &list, 1.0)
        }));
        bad.extend(no_panic(&format!("copy_pages P={p} D={d}"), || {
            ops::copy_pages(&pool, &t(&[4, 2, p, d]), &u32s(&[1, 2]))
        }));
    }
    // Zero query heads: every op that groups query heads by KV head.
    let list = PageList {
        pages: u32s(&[1, 2, 2, 2]),
        queries: u32s(&[1, 2]),
        kv_limit: Tensor::new(&[1u32], &Device::Cpu).unwrap(),
    };
    bad.extend(no_panic("sparse_paged_attention Hq=0", || {
        ops::sparse_paged_attention(&t(&[1, 0, 64]), &t(&[4, 2, 16, 64]), &list, 1.0)
    }));
    bad.extend(no_panic("quest_page_scores Hq=0", || {
        ops::quest_page_scores(&t(&[1, 0, 64]), &t(&[4, 2, 64]), &u32s(&[1, 2, 3]), 0, 1)
    }));
    bad.extend(no_panic("causal_self_attention Hq=0", || {
        ops::causal_self_attention(&t(&[3, 0, 64]), &t(&[3, 2, 64]), &t(&[3, 2, 64]), 1.0)
    }));
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn by_name_rejects_a_budget_of_zero_for_every_algorithm() {
    for &name in spinkv::partition::ALGORITHMS.iter().chain(spinkv::partition::VARIANTS) {
        let e = spinkv::partition::by_name(name, 0)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains(name) && e.contains("budget"), "{name}: {e:?}");
    }
    // The variants are what their names say.
    let quest = |name: &str| spinkv::partition::by_name(name, 512).unwrap();
    assert_eq!(quest("quest-p8").page_size_hint(), Some(8));
    assert!(
        quest("quest-softmax").name().contains("softmax"),
        "{}",
        quest("quest-softmax").name()
    );
    let e = spinkv::partition::by_name("quest-nope", 512).err().unwrap().to_string();
    assert!(e.contains("quest-nope") && e.contains("quest-softmax"), "{e}");
}
