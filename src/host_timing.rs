//! Host-time accounting: named spans of host work summed per label, with their median, 99th
//! percentile and maximum, off by default (one relaxed atomic load per span when off). The
//! engine's decode path marks the parts of a padded step's host work with it, so that the
//! host overhead a replayed CUDA graph leaves can be broken down (`serve_bench
//! --host-timing` prints the table). ShadowKV's compression marks its parts too
//! (`shadowkv.compress` per layer, within it `low_rank.read` — host reads that wait for the
//! queued device work — and the host factorizations `low_rank.cholesky` and
//! `low_rank.eigen`; `shadowkv.store` per sequence and layer in device mode). An eager
//! step's layers are marked too: `model.begin_step`, `model.layers`, `model.end_step`, per
//! layer `layer.qkv` and `layer.mlp`, and within the cache's attend `attend.rope`,
//! `attend.store`, `attend.index`, `attend.requests`, `attend.paged` and `attend.prefill`
//! (and in a padded step's preparation `attend.padded_prep.load`, `.expand` and `.rope`). A
//! padded step's begin is `padded.begin`, within it `padded.begin.*` (`padded.begin.write`:
//! the staging of its words) and `padded.plan.*`, and a replayed step's whole host part,
//! begin through the graph's launch, is `decode.replay_host`; `DeviceTables::apply` is
//! `tables.changes`, `tables.writes`, `tables.upload` and `tables.scatter`. A step's end is
//! `end_step.counters` (the device counters read back: it waits for the step's device
//! work), `end_step.budgets` and `end_step.commit`. Device work is asynchronous, so a
//! span's time is the host's, except where the host waits for the device inside it (a read
//! back): there the device's queued time shows. Spans nest: each label sums its own time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Spans kept per label for the percentiles; later spans still count in the total,
/// the count and the maximum.
const KEPT: usize = 1 << 20;

static ON: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, Label>> = Mutex::new(BTreeMap::new());

#[derive(Default)]
struct Label {
    total: Duration,
    count: u64,
    max: Duration,
    /// The first [`KEPT`] spans' times in nanoseconds (saturating at `u32::MAX`).
    kept: Vec<u32>,
}

/// One label's spans, from [`report`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpanStats {
    /// The label.
    pub label: &'static str,
    /// Summed host time.
    pub total: Duration,
    /// Spans.
    pub count: u64,
    /// Median span (of the first 2^20 spans).
    pub p50: Duration,
    /// 99th-percentile span (of the first 2^20 spans).
    pub p99: Duration,
    /// Longest span.
    pub max: Duration,
}

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

/// Each label's spans (summed time, count, median, 99th percentile, maximum), by label.
/// A mean hides the rare long span (a step that admits sequences, say): the median
/// shows the common one.
pub fn report() -> Vec<SpanStats> {
    let Ok(t) = TOTALS.lock() else {
        return Vec::new();
    };
    t.iter()
        .map(|(&label, l)| {
            let mut kept = l.kept.clone();
            kept.sort_unstable();
            let at = |q: f64| {
                let i = ((kept.len() as f64 - 1.0) * q).round() as usize;
                kept.get(i)
                    .map_or(Duration::ZERO, |&ns| Duration::from_nanos(ns as u64))
            };
            SpanStats {
                label,
                total: l.total,
                count: l.count,
                p50: at(0.5),
                p99: at(0.99),
                max: l.max,
            }
        })
        .collect()
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

/// Adds a span of `d` to `label` (for a span known only afterwards: a step's host part
/// counted once its graph replayed). A no-op when the accounting is off.
pub fn record(label: &'static str, d: Duration) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    if let Ok(mut t) = TOTALS.lock() {
        let e = t.entry(label).or_default();
        e.total += d;
        e.count += 1;
        e.max = e.max.max(d);
        if e.kept.len() < KEPT {
            e.kept.push(u32::try_from(d.as_nanos()).unwrap_or(u32::MAX));
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(t0) = self.start {
            record(self.label, t0.elapsed());
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
        assert!(!r.iter().any(|s| s.label == "host_timing.test.off"));
        let on = r.iter().find(|s| s.label == "host_timing.test.on").expect("on span");
        assert_eq!(on.count, 3);
        assert!(on.total >= Duration::from_millis(3), "{:?}", on.total);
        assert!(
            on.p50 >= Duration::from_millis(1) && on.p50 <= on.p99 && on.p99 <= on.max,
            "{on:?}"
        );
        assert!(on.max <= on.total, "{on:?}");
    }
}
