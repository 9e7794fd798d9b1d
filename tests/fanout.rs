//! `FanOut`: several caches driven with the same inputs. The lead's output is returned
//! and equals a lone cache's; every follower saw the same inputs (its own output equals
//! the lead's for the same algorithm); a failing `begin_step` in a follower leaves no
//! cache with an open step; removing a sequence frees it in every cache; the tap sees
//! each layer's inputs.

mod common;

use common::*;
use spinkv::partition::Dense;
use spinkv::{CacheConfig, FanOut, SparseKvCache, SpinCache, StepInput};
use std::sync::Mutex;

fn cache(tokens: usize) -> SpinCache {
    let cfg = CacheConfig::new(2, 4, 2, 8)
        .with_page_size(8)
        .with_token_capacity(tokens, 1.0);
    SpinCache::new(cfg, Dense::new()).unwrap()
}

#[test]
fn followers_see_the_lead_inputs_and_failures_leave_no_open_step() {
    let (mut a, mut b, mut lone) = (cache(64), cache(16), cache(64));
    let seen = Mutex::new(Vec::new());
    let mut r = rng(5);
    let lone_seq = lone.add_sequence().unwrap();
    {
        let mut fan = FanOut::new(vec![&mut a as &mut dyn SparseKvCache, &mut b]).unwrap();
        fan.set_tap(Some(Box::new(|layer: usize, q: &candle_core::Tensor, _: &_, _: &_| {
            seen.lock().unwrap().push((layer, q.dims()[0]))
        })));
        let seq = fan.add_sequence().unwrap();
        assert_eq!(fan.ids(seq).unwrap().len(), 2);
        // The lead's selections are recorded through the fan-out.
        fan.record_selections(true).unwrap();
        for n in [7usize, 1, 1] {
            fan.begin_step(&[StepInput { seq, new_tokens: n }]).unwrap();
            lone.begin_step(&[StepInput {
                seq: lone_seq,
                new_tokens: n,
            }])
            .unwrap();
            for layer in 0..2 {
                let q = randn(&mut r, &[n, 4, 8], 1.0);
                let k = randn(&mut r, &[n, 2, 8], 1.0);
                let v = randn(&mut r, &[n, 2, 8], 1.0);
                let got = fan.attend(layer, &q, &k, &v).unwrap();
                let want = lone.attend(layer, &q, &k, &v).unwrap();
                assert_eq!(bits(&got), bits(&want), "the lead's output is a lone cache's");
            }
            fan.end_step().unwrap();
            lone.end_step().unwrap();
        }
        assert_eq!(fan.sequence_len(seq).unwrap(), 9);
        // Two decode steps × 2 layers × 2 KV heads.
        assert_eq!(fan.take_selections().len(), 8);
        // A step the lead holds but the follower does not: back-pressure from the
        // follower, and the lead's begun step is aborted (none stays open).
        assert!(fan.begin_step(&[StepInput { seq, new_tokens: 8 }]).is_err());
        fan.begin_step(&[StepInput { seq, new_tokens: 1 }]).unwrap();
        fan.abort_step().unwrap();
        fan.remove_sequence(seq).unwrap();
        assert!(fan.ids(seq).is_err());
    }
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(0, 7), (1, 7), (0, 1), (1, 1), (0, 1), (1, 1)]
    );
    for c in [&a, &b] {
        assert_eq!(c.pool_usage().host_used, 0, "removal frees the pages of every cache");
    }
}
