//! Host-time accounting: named spans of host work summed per label, off by default (one
//! relaxed atomic load per span when off). The engine's decode path marks the parts of a
//! padded step's host work with it, so that the host overhead a replayed CUDA graph
//! leaves can be broken down (`serve_bench --host-timing` prints the table). ShadowKV's
//! compression marks its parts too (`shadowkv.compress` per layer, within it
//! `low_rank.read` — host reads that wait for the queued device work — and the host
//! factorizations `low_rank.cholesky` and `low_rank.eigen`; `shadowkv.store` per
//! sequence and layer in device mode). An eager step's layers are marked too:
//! `model.begin_step`, `model.layers`, `model.end_step`, per layer `layer.qkv` and
//! `layer.mlp`, and within the cache's attend `attend.rope`, `attend.store`,
//! `attend.index`, `attend.requests`, `attend.paged` and `attend.prefill` (and in a
//! padded step's first attend `attend.padded_prep.expand` and `attend.padded_prep.rope`).
//! A padded step's begin is `padded.begin.*` (`padded.begin.write`: its one upload) and
//! `padded.plan.*`; `DeviceTables::apply` is `tables.changes`, `tables.writes`,
//! `tables.upload` and `tables.scatter`. Device work is
//! asynchronous, so a span's time is the host's, except where the host waits for the
//! device inside it (a read back): there the device's queued time shows. Spans nest: each
//! label sums its own time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ON: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());

/// Turns the accounting on or off (the totals are kept; see [`reset`]).
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Clears the totals.
pub fn reset() {
    if let Ok(mut t) = TOTALS.lock() {
        t.clear();
    }
}

/// Each label's summed host time and span count, by label.
pub fn report() -> Vec<(&'static str, Duration, u64)> {
    TOTALS
        .lock()
        .map(|t| t.iter().map(|(k, &(d, n))| (*k, d, n)).collect())
        .unwrap_or_default()
}

/// A span of host work: its time is added to `label`'s total when dropped.
#[must_use = "the span ends when this guard is dropped"]
pub struct Span {
    label: &'static str,
    start: Option<Instant>,
}

/// Starts a span named `label` (a no-op guard when the accounting is off).
pub fn span(label: &'static str) -> Span {
    let start = ON.load(Ordering::Relaxed).then(Instant::now);
    Span { label, start }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(t0) = self.start {
            let d = t0.elapsed();
            if let Ok(mut t) = TOTALS.lock() {
                let e = t.entry(self.label).or_default();
                e.0 += d;
                e.1 += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_sum_only_while_on() {
        reset();
        drop(span("host_timing.test.off"));
        enable(true);
        for _ in 0..3 {
            let _s = span("host_timing.test.on");
            std::thread::sleep(Duration::from_millis(1));
        }
        enable(false);
        drop(span("host_timing.test.on"));
        let r = report();
        assert!(!r.iter().any(|(l, ..)| *l == "host_timing.test.off"));
        let on = r.iter().find(|(l, ..)| *l == "host_timing.test.on").expect("on span");
        assert_eq!(on.2, 3);
        assert!(on.1 >= Duration::from_millis(3), "{:?}", on.1);
    }
}
