//! Sampling a whole batch in one call ([`sample_batch`]) with one seeded
//! [`RequestSampler`] per request.
//!
//! Greedy rows take the argmax **on the logits' device**: only the `[B]` u32 ids cross
//! to the host, never the logits. Rows with `temperature > 0` are the known limitation:
//! their logits rows (`[V]` f32 each, only those rows) are copied to the host, where
//! top-k, temperature, top-p and the seeded draw run (the draw reuses
//! [`models::sampling::Sampler`](crate::models::sampling::Sampler)). A device-side
//! sampler (top-k/top-p over sorted probabilities plus a per-row seeded uniform) would
//! remove that copy.

use super::request::SamplingParams;
use crate::models::sampling::{Sampler, SamplingConfig};
use crate::{Error, Result};
use candle_core::{DType, Tensor, D};

/// The sampling state of one request: its settings and its random generator, advanced
/// only by this request's draws (so a seeded request samples the same tokens whatever
/// runs beside it).
#[derive(Debug, Clone)]
pub struct RequestSampler {
    params: SamplingParams,
    sampler: Sampler,
}

impl RequestSampler {
    /// A sampler for `params` (validate them first: see [`SamplingParams::validate`]).
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            sampler: Sampler::new(SamplingConfig {
                temperature: params.temperature,
                top_p: params.top_p,
                seed: params.seed,
            }),
        }
    }

    /// The settings.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Draws from one row of logits on the host (non-greedy path): top-k cut, then
    /// temperature and top-p.
    fn sample_host(&mut self, mut row: Vec<f32>) -> u32 {
        let k = self.params.top_k;
        if k > 0 && k < row.len() {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.select_nth_unstable_by(k - 1, |&a, &b| {
                row[b].partial_cmp(&row[a]).unwrap_or(std::cmp::Ordering::Equal)
            });
            for &i in &order[k..] {
                row[i] = f32::NEG_INFINITY;
            }
        }
        self.sampler.sample_slice(&row)
    }
}

/// Samples one token per entry of `rows` from `logits` in one call.
///
/// * `logits` — `[B, V]` f32 (any device), one row per sequence of the step.
/// * `rows` — the logits row each sampler draws from (`< B`), aligned with `samplers`.
///
/// Returns the sampled ids, aligned with `rows`. Greedy rows are one device argmax over
/// the selected rows (`[n]` u32 copied back); others go through the host (see the module
/// docs).
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
    let mut out = vec![0u32; rows.len()];
    let greedy: Vec<usize> = (0..rows.len()).filter(|&i| samplers[i].params.is_greedy()).collect();
    if !greedy.is_empty() {
        let picked = if greedy.len() == b && greedy.iter().all(|&i| rows[i] == i) {
            logits.clone()
        } else {
            let idx: Vec<u32> = greedy.iter().map(|&i| rows[i] as u32).collect();
            let idx = Tensor::from_vec(idx, greedy.len(), logits.device())?;
            logits.index_select(&idx, 0)?
        };
        let ids = picked.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        for (&i, id) in greedy.iter().zip(ids) {
            out[i] = id;
        }
    }
    let random: Vec<usize> = (0..rows.len()).filter(|&i| !samplers[i].params.is_greedy()).collect();
    if !random.is_empty() {
        let idx: Vec<u32> = random.iter().map(|&i| rows[i] as u32).collect();
        let idx = Tensor::from_vec(idx, random.len(), logits.device())?;
        let host = logits.index_select(&idx, 0)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (&i, row) in random.iter().zip(host) {
            out[i] = samplers[i].sample_host(row);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn greedy_rows_on_device_and_seeded_rows_independent_of_the_batch() {
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
        assert!(sample_batch(&l, &[3], &mut [&mut g]).is_err());
        assert!(sample_batch(&l, &[0, 1], &mut [&mut g]).is_err());
    }
}
