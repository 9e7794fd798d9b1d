//! Sampling a whole batch in one call ([`sample_batch`]) with one [`RequestSampler`] per
//! request, through [`ops::sample_rows`](crate::ops::sample_rows) on the logits' device:
//! only the `[n]` sampled ids cross to the host, never the logits. Every draw is a
//! function of the request's seed and its draw counter (no generator state), so a
//! request samples the same tokens in any batch, and the decode step captured in a CUDA
//! graph (which samples inside the graph from [`RequestSampler::row`]) draws what the
//! eager path would.

use super::request::SamplingParams;
use crate::ops::{sample_params, sample_rows, SampleRow};
use crate::{Error, Result};
use candle_core::Tensor;

/// The sampling state of one request: its settings and the number of tokens it drew.
#[derive(Debug, Clone)]
pub struct RequestSampler {
    params: SamplingParams,
    draws: u32,
}

impl RequestSampler {
    /// A sampler for `params` (validate them first: see [`SamplingParams::validate`]).
    pub fn new(params: SamplingParams) -> Self {
        Self { params, draws: 0 }
    }

    /// The settings.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The [`SampleRow`] of this request's next draw.
    pub fn row(&self) -> SampleRow {
        let p = &self.params;
        SampleRow {
            temperature: p.temperature as f32,
            top_k: p.top_k.min(u32::MAX as usize) as u32,
            top_p: p.top_p as f32,
            seed: p.seed,
            counter: self.draws,
        }
    }

    /// Counts a draw made from [`row`](Self::row) (the next one uses the next counter).
    pub fn advance(&mut self) {
        self.draws = self.draws.wrapping_add(1);
    }
}

/// Samples one token per entry of `rows` from `logits` in one call.
///
/// * `logits` — `[B, V]` f32 (any device), one row per sequence of the step.
/// * `rows` — the logits row each sampler draws from (`< B`), aligned with `samplers`.
///
/// Returns the sampled ids, aligned with `rows`, and advances each sampler.
pub fn sample_batch(logits: &Tensor, rows: &[usize], samplers: &mut [&mut RequestSampler]) -> Result<Vec<u32>> {
    const OP: &str = "sample_batch";
    let (b, v) = logits.dims2().map_err(|_| Error::Invalid {
        op: OP,
        msg: format!("logits must be [B, V], got {:?}", logits.dims()),
    })?;
    if rows.len() != samplers.len() {
        crate::invalid!(OP, "{} rows but {} samplers", rows.len(), samplers.len());
    }
    if let Some(&r) = rows.iter().find(|&&r| r >= b) {
        crate::invalid!(OP, "row {r} out of range for logits [{b}, {v}]");
    }
    if v == 0 {
        crate::invalid!(OP, "logits have an empty vocabulary dimension");
    }
    let dev = logits.device();
    let picked = if rows.len() == b && rows.iter().enumerate().all(|(i, &r)| r == i) {
        logits.clone()
    } else {
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        logits.index_select(&Tensor::from_vec(idx, rows.len(), dev)?, 0)?
    };
    let params: Vec<SampleRow> = samplers.iter().map(|s| s.row()).collect();
    let ids = sample_rows(
        &picked.to_dtype(candle_core::DType::F32)?,
        &sample_params(&params, dev)?,
    )?
    .to_vec1::<u32>()?;
    for s in samplers.iter_mut() {
        s.advance();
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn greedy_rows_and_seeded_rows_independent_of_the_batch() {
        let l = Tensor::new(
            &[[0.0f32, 5.0, 1.0, 4.9], [3.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.2, 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        let mut g = RequestSampler::new(SamplingParams::greedy());
        let mut g2 = RequestSampler::new(SamplingParams::greedy());
        let ids = sample_batch(&l, &[2, 0], &mut [&mut g, &mut g2]).unwrap();
        assert_eq!(ids, vec![2, 1]);
        // top_k = 1 with any temperature is the argmax.
        let mut k1 = RequestSampler::new(SamplingParams {
            top_k: 1,
            ..SamplingParams::random(5.0, 9)
        });
        assert_eq!(sample_batch(&l, &[0], &mut [&mut k1]).unwrap(), vec![1]);
        // top_k = 2 keeps ids 1 and 3 only.
        let p = SamplingParams {
            top_k: 2,
            ..SamplingParams::random(10.0, 3)
        };
        let mut a = RequestSampler::new(p);
        let alone: Vec<u32> = (0..40)
            .map(|_| sample_batch(&l, &[0], &mut [&mut a]).unwrap()[0])
            .collect();
        assert!(
            alone.iter().all(|&t| t == 1 || t == 3) && alone.contains(&3),
            "{alone:?}"
        );
        // The same seed beside other rows (greedy and random) draws the same tokens.
        let mut a = RequestSampler::new(p);
        let mut other = RequestSampler::new(SamplingParams::random(1.0, 77));
        let mut g = RequestSampler::new(SamplingParams::greedy());
        let batched: Vec<u32> = (0..40)
            .map(|_| sample_batch(&l, &[1, 0, 2], &mut [&mut g, &mut a, &mut other]).unwrap()[1])
            .collect();
        assert_eq!(alone, batched);
        assert_eq!(a.row().counter, 40);
        assert!(sample_batch(&l, &[3], &mut [&mut g]).is_err());
        assert!(sample_batch(&l, &[0, 1], &mut [&mut g]).is_err());
    }
}
