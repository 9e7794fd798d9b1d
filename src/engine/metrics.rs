//! Measurements: per request ([`Timings`]: queued time, TTFT, per-token times, from which
//! TPOT and inter-token latencies follow) and for the engine ([`EngineMetrics`]:
//! prefill and decode throughput, queue lengths, cache statistics), plus the
//! [`percentile`] helper and the [`LatencySummary`] the examples use to summarize them.

use crate::{PoolUsage, StepStats};
use std::time::Duration;

/// Timings of one request. Every instant is measured from `submit`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    /// From submission to admission (the request waited for room in the cache or for a
    /// sequence slot). Equals `total` for a request never admitted.
    pub queued: Duration,
    /// From submission to each generated token being sampled (one entry per output
    /// token, stop tokens excluded).
    pub token_times: Vec<Duration>,
    /// From submission to the completion.
    pub total: Duration,
}

impl Timings {
    /// Time to first token: submission → first output token; `None` without tokens.
    pub fn ttft(&self) -> Option<Duration> {
        self.token_times.first().copied()
    }

    /// Time per output token after the first: `(last − first) / (n − 1)`; `None` with
    /// fewer than two tokens.
    pub fn tpot(&self) -> Option<Duration> {
        let n = self.token_times.len();
        if n < 2 {
            return None;
        }
        Some((self.token_times[n - 1] - self.token_times[0]) / (n as u32 - 1))
    }

    /// Inter-token latencies: the gaps between consecutive output tokens (`n − 1` of
    /// them).
    pub fn itl(&self) -> Vec<Duration> {
        self.token_times.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

/// A snapshot of the engine's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineMetrics {
    /// Steps run (model forward calls over a batch).
    pub steps: u64,
    /// Prompt tokens fed to the model.
    pub prefill_tokens: u64,
    /// Output tokens generated (sampled), over all requests.
    pub decode_tokens: u64,
    /// Wall time of steps that carried at least one prefill chunk, seconds.
    pub prefill_secs: f64,
    /// Wall time of steps that carried only decodes, seconds.
    pub decode_only_secs: f64,
    /// Output tokens sampled in decode-only steps.
    pub decode_only_tokens: u64,
    /// Wall time of all steps (scheduling, forward, sampling, streaming), seconds.
    pub busy_secs: f64,
    /// Requests waiting for admission.
    pub waiting: usize,
    /// Requests admitted and not finished (prefilling or decoding).
    pub running: usize,
    /// Requests submitted since the engine started.
    pub submitted: u64,
    /// Requests finished by a stop token or stop string, or by reaching
    /// `max_new_tokens`.
    pub completed: u64,
    /// Requests cancelled (by their handle, or because the handle was dropped).
    pub cancelled: u64,
    /// Requests finished with an error.
    pub errored: u64,
    /// Page-slot usage of both cache tiers.
    pub cache_usage: PoolUsage,
    /// The cache's lifetime counters (hits, misses, bytes moved, pages attended).
    pub cache_stats: StepStats,
    /// How decode-only steps ran: padded eagerly, captured, replayed, or ragged.
    pub decode: super::DecodeCounters,
}

impl EngineMetrics {
    /// Prompt tokens per second of the steps that carried prefill.
    pub fn prefill_tps(&self) -> f64 {
        self.prefill_tokens as f64 / self.prefill_secs.max(1e-9)
    }

    /// Output tokens per second of decode-only steps (the steady-state decode rate).
    pub fn decode_tps(&self) -> f64 {
        self.decode_only_tokens as f64 / self.decode_only_secs.max(1e-9)
    }

    /// Output tokens per second of busy time, all steps included (end-to-end
    /// generation throughput).
    pub fn output_tps(&self) -> f64 {
        self.decode_tokens as f64 / self.busy_secs.max(1e-9)
    }
}

/// Memory in use on `device` (the whole device, every process: total − free), in
/// bytes; `None` on the CPU or when the driver cannot say.
pub fn device_memory_used(device: &candle_core::Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => {
            let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
            Some(total.saturating_sub(free) as u64)
        }
        _ => None,
    }
}

/// The `p`-th percentile (`p` in `[0, 100]`, nearest rank) of `values`; `None` when empty.
pub fn percentile(values: &[Duration], p: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((p.clamp(0.0, 100.0) / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// The median and 99th percentile of a set of durations (`None` when empty).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct P50P99 {
    /// 50th percentile.
    pub p50: Option<Duration>,
    /// 99th percentile.
    pub p99: Option<Duration>,
}

impl P50P99 {
    /// The percentiles of `values` (nearest rank, see [`percentile`]).
    pub fn of(values: &[Duration]) -> Self {
        Self {
            p50: percentile(values, 50.0),
            p99: percentile(values, 99.0),
        }
    }
}

/// Latency percentiles over many requests: TTFT and TPOT (one value per request that
/// has them) and inter-token latencies (every gap of every request).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencySummary {
    /// Time to first token.
    pub ttft: P50P99,
    /// Time per output token after the first.
    pub tpot: P50P99,
    /// Inter-token latency.
    pub itl: P50P99,
    /// Every request's TTFT, in the order given (for distributions).
    pub ttfts: Vec<Duration>,
}

impl LatencySummary {
    /// Summarizes the timings of finished requests.
    pub fn of<'a>(timings: impl IntoIterator<Item = &'a Timings>) -> Self {
        let (mut ttfts, mut tpot, mut itl) = (Vec::new(), Vec::new(), Vec::new());
        for t in timings {
            ttfts.extend(t.ttft());
            tpot.extend(t.tpot());
            itl.extend(t.itl());
        }
        Self {
            ttft: P50P99::of(&ttfts),
            tpot: P50P99::of(&tpot),
            itl: P50P99::of(&itl),
            ttfts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttft_tpot_itl_and_percentiles() {
        let ms = Duration::from_millis;
        let t = Timings {
            queued: ms(5),
            token_times: vec![ms(100), ms(110), ms(130), ms(160)],
            total: ms(170),
        };
        assert_eq!(t.ttft(), Some(ms(100)));
        assert_eq!(t.tpot(), Some(ms(20)));
        assert_eq!(t.itl(), vec![ms(10), ms(20), ms(30)]);
        assert_eq!(Timings::default().tpot(), None);
        let v: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&v, 50.0), Some(ms(50)));
        assert_eq!(percentile(&v, 99.0), Some(ms(99)));
        assert_eq!(percentile(&v, 0.0), Some(ms(1)));
        assert_eq!(percentile(&[], 50.0), None);
        let s = LatencySummary::of([&t, &Timings::default()]);
        assert_eq!(s.ttfts, vec![ms(100)]);
        assert_eq!((s.ttft.p50, s.tpot.p99), (Some(ms(100)), Some(ms(20))));
        assert_eq!((s.itl.p50, s.itl.p99), (Some(ms(20)), Some(ms(30))));
        assert_eq!(LatencySummary::of([]).ttft, P50P99::default());
    }
}
